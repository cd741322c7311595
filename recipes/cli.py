"""The `rlhf` command: `rlhf <stage> <fit|validate|test|predict> [--config FILE ...] [--key value ...]`."""

from __future__ import annotations

import importlib
import sys

# errors that say all a user needs in one line on stderr (no traceback), each with its exit code
EXIT_CODES = {
    "DataError": 3,  # a bad row or file: path:line: reason
    "ModelPathError": 3,  # a missing local model folder
    "NonFiniteError": 4,  # NaN/inf loss, gradient, logits or weights: stopped at that step
    "OutputExistsError": 5,  # save_dir holds something we did not write
    "PipelineConfigError": 2,  # rlhf pipeline: a bad pipeline file, file:line: reason per problem (nothing ran)
    "StageFailedError": 6,  # rlhf pipeline: a stage exited nonzero: its name, exit code and log
    "LabelsPendingError": 7,  # python -m datamodules.labelling --labeller human: too few labels yet, queue written
}
DATA_ERROR_EXIT = EXIT_CODES["DataError"]
STAGES = {
    "sft": "recipes.sft",
    "reward": "recipes.reward",
    "dpo": "recipes.dpo",
    "ppo": "recipes.ppo",
    "rs": "recipes.rejection_sampling",
}
TOOLS = {
    "quickstart": ("recipes.quickstart", "the whole pipeline on the built-in task, offline, in minutes"),
    "convert-gguf": ("recipes.convert", "dequantise a GGUF checkpoint into a Hugging Face folder"),
    "generate": ("recipes.generate", "sample responses from a saved policy or checkpoint into a jsonl file"),
    "relabel": ("recipes.relabel", "hindsight relabelling: samples paired with the prompt they fulfil, as SFT rows"),
    "eval": ("recipes.eval", "win rate vs a baseline, judge scores, KL to a reference, from generation files"),
    "report": ("recipes.report", "plots of runs' metrics.csv and eval.json files in report.md / report.html"),
    "pipeline": ("recipes.pipeline", "stages chained from one YAML, with a manifest; re-runs skip or resume stages"),
    "label": ("recipes.label", "the human-feedback web app: annotators, serve a labelling queue, export labels"),
    "critique-revise": ("recipes.critique_revise", "Constitutional AI: answers critiqued and revised under a "
                        "constitution, as SFT data"),
}

USAGE = """usage: rlhf <command> [args]

stages (LightningCLI: fit | validate | test | predict, --config FILE, --key value, --help):
  sft        supervised fine-tuning on demonstrations
  reward     reward model on preferences / rankings
  dpo        direct preference optimisation
  ppo        PPO against a reward model
  rs         rejection sampling (best-of-K fine-tuning)

tools:
{tools}
"""


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(tools="\n".join(f"  {k:<16}{v[1]}" for k, v in TOOLS.items())))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in STAGES:
        target = STAGES[command]
    elif command in TOOLS:
        target = TOOLS[command][0]
    else:
        print(f"rlhf: unknown command {command!r}\n" + USAGE.format(tools=", ".join(TOOLS)), file=sys.stderr)
        return 2
    # sys.argv stays whole: DDP's launcher re-runs it in each child process
    try:
        importlib.import_module(target).main(rest)
    except Exception as err:  # Lightning re-raises what fit raised, e.g. DataError from datamodule.setup
        code = exit_code(err)
        if code is None:
            raise
        print(one_line(err), file=sys.stderr)
        return code
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the DDP process group a stage started, while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads can be torn down joinable and the process aborts
    (SIGABRT, `terminate called without an active exception`) after the work is done and written.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_code(err: BaseException) -> int | None:
    """EXIT_CODES of our own error classes (matched by name along the class's bases: no torch import here)."""
    for cls in type(err).__mro__:
        if cls.__name__ in EXIT_CODES and cls.__module__.split(".")[0] in ("core", "modules", "datamodules"):
            return EXIT_CODES[cls.__name__]
    return None


def one_line(err: BaseException) -> str:
    """`path:line: reason (detail)` as one line: a detail quoting a hub error may span several."""
    return " ".join(str(err).splitlines())


if __name__ == "__main__":
    sys.exit(main())
