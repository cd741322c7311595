"""`rlhf sft <fit|validate|test|predict>`: supervised fine-tuning."""

from __future__ import annotations

import sys

from recipes.common import run_cli


def main(args: list[str] | None = None):
    from datamodules.sft import SFTDataModule
    from modules.sft import SFTModule

    return run_cli(SFTModule, SFTDataModule, "sft", [("model.policy.path", "data.tokenizer")], args)


if __name__ == "__main__":
    main(sys.argv[1:])
