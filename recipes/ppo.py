"""`rlhf ppo <fit|validate>`: PPO against a reward model (or the synthetic task's oracle)."""

from __future__ import annotations

import sys

from recipes.common import run_cli


def main(args: list[str] | None = None):
    from datamodules.prompts import PromptDataModule
    from modules.ppo import PPOModule

    return run_cli(PPOModule, PromptDataModule, "ppo", [("model.policy.path", "data.tokenizer")], args)


if __name__ == "__main__":
    main(sys.argv[1:])
