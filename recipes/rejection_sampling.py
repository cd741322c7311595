"""`rlhf rs <fit|validate|test|predict>`: rejection sampling (best-of-K fine-tuning against a reward)."""

from __future__ import annotations

import sys

from recipes.common import run_cli

LINKS = [
    ("model.policy.path", "data.tokenizer"),
    ("model.rounds", "trainer.max_epochs"),  # a round is one pass over the prompt set
]


def main(args: list[str] | None = None):
    from datamodules.prompts import PromptDataModule
    from modules.rejection_sampling import RejectionSamplingModule

    return run_cli(RejectionSamplingModule, PromptDataModule, "rs", LINKS, args)


if __name__ == "__main__":
    main(sys.argv[1:])
