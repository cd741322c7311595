"""The KTO workload through TRL 1.16's KTOTrainer, side by side with `benchmarks/dpo.py --loss kto`. Run it from a
separate venv that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_kto.py               # 3 warm-up + 20 timed steps
    /tmp/trlvenv/bin/python benchmarks/trl_kto.py --steps 2     # smoke run

The 512 pairs as 1,024 unpaired rows {prompt, completion, label} (benchmarks.common.unpaired_rows: each pair's
chosen desirable and its rejected undesirable, as TRL's unpair_preference_dataset makes them, shuffled once with
seed 0 so a batch is not all desirable), read in that order (KTOTrainer's sequential sampler; ours reads the same
file in the same order), batch 8 rows plus the 8 mismatched rows of the KL estimate, loss "kto", beta 0.1,
desirable and undesirable weights 1, a frozen copy of the model as reference, lr 1e-5, fp32, no gradient
checkpointing, 2 threads; rows/s (a row = one labelled sequence) over the timed steps (clock from the start of
optimizer step 3 to the end of training), peak RSS. KTOTrainer cuts sequences from the end to max_length, so each
row is cut on token ids here as our PreferenceDataModule cuts it (prompt from the left, benchmarks.common.cut_to_fit)
and max_length is left 8 tokens of slack. Differences that stay: the mismatched rows are the batch's completions
rotated by one (ours take the next row whose prompt differs, the same rotation unless two rows share a prompt), and
TRL projects every position through the vocabulary head where ours projects completion positions only.
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
        from trl import KTOConfig, KTOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        config = KTOConfig(
            output_dir=str(out), per_device_train_batch_size=8, max_length=512 + 8, beta=0.1, loss_type="kto",
            desirable_weight=1.0, undesirable_weight=1.0, max_steps=args.warmup + args.steps, learning_rate=1e-5,
            lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
        )
        return KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[callback])

    run_trl_preference("trl-kto", make_trainer, unpaired=True, warmup=args.warmup, steps=args.steps)


if __name__ == "__main__":
    main()
