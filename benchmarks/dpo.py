"""DPO throughput and memory on the standard workload (see benchmarks/README.md).

512 HH-RLHF pairs, sigmoid loss, beta 0.1, batch 8 pairs, max length 512, 20 optimizer steps timed after 3
warm-up steps, through the real PreferenceDataModule + DPOModule + Lightning Trainer.

    python benchmarks/dpo.py                          # reference = frozen copy
    python benchmarks/dpo.py --reference precomputed  # one pass stores reference log-probs, one model held
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import preference_parser, run_preference  # noqa: E402


def main() -> None:
    parser = preference_parser()
    parser.add_argument("--reference", default="copy", choices=["copy", "precomputed"])
    args = parser.parse_args()

    def make_module(model_dir: str, out: Path):
        from core.models import ModelSpec
        from modules.dpo import DPOModule

        return DPOModule(ModelSpec(path=model_dir), reference=args.reference, beta=0.1, save_dir=str(out))

    run_preference(f"dpo-{args.reference}", args, make_module)


if __name__ == "__main__":
    main()
