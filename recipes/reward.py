"""`rlhf reward <fit|validate|test|predict>`: reward model on preference pairs or K-wise rankings."""

from __future__ import annotations

import sys

from recipes.common import run_cli


def main(args: list[str] | None = None):
    from datamodules.preference import PreferenceDataModule
    from modules.reward import RewardModule

    return run_cli(RewardModule, PreferenceDataModule, "reward", [("model.backbone.path", "data.tokenizer")], args)


if __name__ == "__main__":
    main(sys.argv[1:])
