"""The `rlhf` command: `rlhf <stage> <fit|validate|test|predict> [--config FILE ...] [--key value ...]`."""

from __future__ import annotations

import importlib
import sys

STAGES = {"sft": "recipes.sft", "reward": "recipes.reward", "dpo": "recipes.dpo", "ppo": "recipes.ppo", "rs": "recipes.rejection_sampling"}
TOOLS = {
    "quickstart": ("recipes.quickstart", "the whole pipeline on the built-in task, offline, in minutes"),
    "convert-gguf": ("recipes.convert", "dequantise a GGUF checkpoint into a Hugging Face folder"),
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
        print(USAGE.format(tools="\n".join(f"  {k:<11}{v[1]}" for k, v in TOOLS.items())))
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
    importlib.import_module(target).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
