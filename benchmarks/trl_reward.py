"""The reward-model workload through TRL's RewardTrainer, for a side-by-side number. Run it from a separate venv
that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_reward.py

Same pairs, model (with a scalar head), batch 8 pairs, lr, 3 warm-up + 20 timed steps as benchmarks/reward.py.
RewardTrainer drops pairs longer than max_length instead of cutting them, so the cut is done here on token ids
the way our PreferenceDataModule does it (prompt cut from the left down to 256 tokens if needed, then the
responses cut to fit 512) and the texts are handed over as prompt/chosen/rejected.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    build_standard_model,
    cut_to_fit,
    hf_step_timer,
    hh_pairs,
    peak_rss_gib,
    report,
    setup_threads,
)

WARMUP, STEPS, MAX_LENGTH, MAX_PROMPT = 3, 20, 512, 256


def main() -> None:
    setup_threads(2)
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-reward-"))
    pairs = hh_pairs(512)
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for p in pairs:
        prompt, (chosen, rejected) = cut_to_fit(tok, p["prompt"], [p["chosen"], p["rejected"]], MAX_LENGTH, MAX_PROMPT)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    pairs_per_step: list[int] = []
    clock = {}

    config = RewardConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=8, max_length=MAX_LENGTH + 8,
        max_steps=WARMUP + STEPS, learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, bf16=False, gradient_checkpointing=False,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[hf_step_timer(WARMUP, clock)])
    kept = len(trainer.train_dataset)
    collate = trainer.data_collator

    def counting_collate(examples):
        pairs_per_step.append(len(examples))
        return collate(examples)

    trainer.data_collator = counting_collate
    trainer.train()
    n = sum(pairs_per_step[WARMUP : WARMUP + STEPS])
    seconds = clock["end"] - clock["start"]
    report("trl-reward", {"pairs_timed": n, "pairs_kept": kept, "seconds": round(seconds, 2),
                          "pairs_per_s": round(n / seconds, 2), "peak_rss_gib": round(peak_rss_gib(), 2)})


if __name__ == "__main__":
    main()
