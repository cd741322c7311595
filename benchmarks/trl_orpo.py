"""The ORPO workload through TRL 1.16's ORPOTrainer (trl.experimental.orpo), side by side with
`benchmarks/dpo.py --loss orpo`. Run it from a separate venv that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_orpo.py               # 3 warm-up + 20 timed steps
    /tmp/trlvenv/bin/python benchmarks/trl_orpo.py --steps 2     # smoke run

Same 512 pairs, model, batch 8 pairs (chosen and rejected concatenated: 16 rows in one forward), beta (TRL's
lambda) 0.1, no reference model, lr 1e-5, fp32, no gradient checkpointing, 2 threads; pairs/s over the timed
steps (clock from the start of optimizer step 3 to the end of training), peak RSS. ORPOTrainer cuts only the
responses (never the prompt) to max_length, so the texts are cut on token ids here as our PreferenceDataModule
cuts them (benchmarks.common.cut_to_fit) and max_length is left 8 tokens of slack so TRL cuts nothing more.
Differences that stay: TRL shuffles the pairs with its own seed (ours with our loader's), and it projects every
position through the vocabulary head where ours projects completion positions only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_trl_preference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    def make_trainer(model_dir, rows, out, callback):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        config = ORPOConfig(
            output_dir=str(out), per_device_train_batch_size=8, max_length=512 + 8, beta=0.1,
            max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1000,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False,
            gradient_checkpointing=False,
        )
        return ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config,
                           train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[callback])

    run_trl_preference("trl-orpo", make_trainer, warmup=args.warmup, steps=args.steps)


if __name__ == "__main__":
    main()
