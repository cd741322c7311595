"""Reward-model throughput and memory on the standard workload (see benchmarks/README.md).

512 HH-RLHF pairs, pairwise loss, batch 8 pairs (16 rows), max length 512, 20 optimizer steps timed after 3
warm-up steps, through the real PreferenceDataModule + RewardModule + Lightning Trainer.

    python benchmarks/reward.py [--packing | --share-prompt]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import preference_parser, run_preference  # noqa: E402


def main() -> None:
    args = preference_parser().parse_args()

    def make_module(model_dir: str, out: Path):
        from core.models import ModelSpec
        from modules.reward import RewardModule

        return RewardModule(ModelSpec(path=model_dir), save_dir=str(out))

    run_preference("reward", args, make_module)


if __name__ == "__main__":
    main()
