"""DPO throughput and memory on the standard workload (see benchmarks/README.md).

512 HH-RLHF pairs, beta 0.1, batch 8 pairs, max length 512, 20 optimizer steps timed after 3 warm-up steps,
through the real PreferenceDataModule + DPOModule + Lightning Trainer.

    python benchmarks/dpo.py                          # sigmoid loss, reference = frozen copy
    python benchmarks/dpo.py --reference precomputed  # one pass stores reference log-probs, one model held
    python benchmarks/dpo.py --loss orpo              # reference none; ORPO's beta (lambda) 0.1, as TRL's default
    python benchmarks/dpo.py --loss simpo             # reference none; beta 2.0, gamma 0.5 (SimPO's scale)
    python benchmarks/dpo.py --loss kto               # unpaired rows, reference = frozen copy: rows/s, not pairs/s

The paired losses (sigmoid, simpo, orpo) report pairs/s (a pair = prompt + chosen + rejected, two sequences).
kto reads the 512 pairs as 1,024 unpaired rows {prompt, completion, label} (each pair's chosen desirable, its
rejected undesirable, as TRL's unpair_preference_dataset; shuffled once with seed 0 and read in that order, as
benchmarks/trl_kto.py hands them to KTOTrainer), batch 8 rows plus their 8 mismatched rows for the KL estimate,
and reports rows/s (a row = one labelled sequence; a pair/s of the paired losses is two sequences/s).
simpo, orpo and kto also report peak_rss_train_gib (the peak before fit's export), the one to set beside the TRL
scripts' peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import preference_parser, run_preference  # noqa: E402

BETA = {"sigmoid": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


def main() -> None:
    parser = preference_parser()
    parser.add_argument("--reference", default=None, choices=["copy", "precomputed"],
                        help="sigmoid and kto (default copy); simpo and orpo always run with reference none")
    parser.add_argument("--loss", default="sigmoid", choices=list(BETA))
    args = parser.parse_args()
    reference_free = args.loss in ("simpo", "orpo")
    if reference_free and args.reference is not None:
        parser.error(f"--loss {args.loss} is reference-free (reference none): drop --reference")
    if args.loss == "kto" and (args.packing or args.share_prompt or args.reference == "precomputed"):
        parser.error("--loss kto batches padded unpaired rows with a frozen-copy reference: drop --packing, "
                     "--share-prompt and --reference precomputed")
    reference = "none" if reference_free else args.reference or "copy"

    def make_module(model_dir: str, out: Path):
        from core.models import ModelSpec
        from modules.dpo import DPOModule

        return DPOModule(ModelSpec(path=model_dir), reference=reference, beta=BETA[args.loss], loss_type=args.loss,
                         save_dir=str(out))

    name = f"dpo-{reference}" if args.loss == "sigmoid" else f"{args.loss}-{reference}"
    run_preference(name, args, make_module, unpaired=args.loss == "kto", train_rss=args.loss != "sigmoid")


if __name__ == "__main__":
    main()
