"""The same SFT workload through TRL's SFTTrainer, for a side-by-side number. Run it from a separate venv that
has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_sft.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    build_standard_model,
    hf_step_timer,
    hh_pairs,
    peak_rss_gib,
    report,
    setup_threads,
)

WARMUP, STEPS = 3, 20


def main() -> None:
    setup_threads(2)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-sft-"))
    pairs = hh_pairs(512)
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    tokens_per_batch: list[int] = []
    clock = {}

    config = SFTConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=8, max_length=512, truncation_mode="keep_end",
        max_steps=WARMUP + STEPS, learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, bf16=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         callbacks=[hf_step_timer(WARMUP, clock)])
    collate = trainer.data_collator

    def counting_collate(examples):
        batch = collate(examples)
        tokens_per_batch.append(
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        return batch

    trainer.data_collator = counting_collate
    trainer.train()
    tokens = sum(tokens_per_batch[WARMUP : WARMUP + STEPS])
    seconds = clock["end"] - clock["start"]
    report("trl-sft", {"non_pad_tokens": tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 1), "peak_rss_gib": round(peak_rss_gib(), 2)})


if __name__ == "__main__":
    main()
