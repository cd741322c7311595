"""`rlhf quickstart`: the pipeline on the built-in reverse task, offline, on a CPU, in minutes.

Builds a tiny tokenizer and Llama in-process, writes the task's data, runs each stage through its real recipe
and config (configs/<stage>/synthetic.yaml), and prints the held-out oracle score after each stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from recipes.common import quiet

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def oracle_eval(model_dir: str | Path, prompts_file: Path, temperature: float = 1.0, seed: int = 0) -> float:
    """Mean oracle score of one sampled response per held-out prompt (temperature 0 = greedy)."""
    from datamodules.synthetic import mean_oracle_score
    from modules.generation import SamplingSpec, decode_responses, generate, prompt_batch
    from modules.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), trainable=False)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines() if line.strip()]
    ids, mask = prompt_batch(tok, prompts)
    spec = SamplingSpec(max_new_tokens=16, temperature=temperature)
    rollout = generate(model, ids, mask, spec, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed))
    return mean_oracle_score(prompts, decode_responses(tok, rollout))


def run_stage(stage: str, config: str, overrides: list[str]) -> None:
    import importlib
    import sys

    from recipes.cli import STAGES

    sys.argv = [f"rlhf {stage}"]
    importlib.import_module(STAGES[stage]).main(["fit", "--config", str(CONFIGS / config), *overrides])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf quickstart", description=__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, models and logs")
    parser.add_argument("--n-train", type=int, default=4000, help="training rows per data file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet()
    from datamodules.synthetic import make_demonstrations, write_task
    from modules.models import build_tiny_model

    out = Path(args.out).resolve()
    start = time.time()
    files = write_task(out / "data", n_train=args.n_train, n_val=200, seed=args.seed)
    texts = [r["prompt"] + r["completion"] for r in make_demonstrations(2000, seed=args.seed + 123)]
    build_tiny_model(out / "base", texts, vocab_size=320, hidden_size=64, num_layers=2, seed=args.seed)
    val_prompts = files["prompts_val"]
    results = [("base (random init)", oracle_eval(out / "base", val_prompts), str(out / "base"))]
    common = [f"--trainer.logger.init_args.save_dir={out / 'logs'}", f"--trainer.default_root_dir={out / 'logs'}"]

    run_stage(
        "sft",
        "sft/synthetic.yaml",
        [
            f"--model.policy.path={out / 'base'}",
            f"--data.train_file={files['sft_train']}",
            f"--data.val_file={files['sft_val']}",
            f"--model.save_dir={out / 'sft'}",
            *common,
        ],
    )
    results.append(("sft", oracle_eval(out / "sft", val_prompts), str(out / "sft")))

    print("\n== rlhf quickstart: held-out oracle score (reverse task, 200 prompts, one sample each at T=1) ==")
    for name, score, path in results:
        print(f"  {name:<22} {score:6.3f}   {path}")
    print(f"data: {out / 'data'}   logs: {out / 'logs'}   wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
