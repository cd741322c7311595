"""`rlhf dpo <fit|validate|test|predict>`: direct preference optimisation on preference pairs."""

from __future__ import annotations

import sys
import warnings

from recipes.common import run_cli


def main(args: list[str] | None = None):
    from datamodules.preference import PreferenceDataModule
    from modules.dpo import DPOModule

    # the frozen reference copy is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    return run_cli(DPOModule, PreferenceDataModule, "dpo", [("model.policy.path", "data.tokenizer")], args)


if __name__ == "__main__":
    main(sys.argv[1:])
