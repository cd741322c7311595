"""The PPO workload through TRL's GRPOTrainer, for a side-by-side number (TRL 1.16 has no PPOTrainer; GRPOTrainer
is its flagship online RL trainer), and against `benchmarks/ppo.py --advantage grpo` like for like. Run it from a
separate venv that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_grpo.py                  # 128 episodes, the last 64 timed
    /tmp/trlvenv/bin/python benchmarks/trl_grpo.py --episodes 32    # smoke run: 1 warm-up round, 1 timed

Workload and timed window: benchmarks/trl_online.py (shared with trl_rloo.py). In short: rounds of 16 completions
(8 prompts x group 2), each trained on 4 times, beta 0.05, 64 new tokens at temperature 1; `--episodes E` runs E / 16
rounds and times the second half: the clock runs from the start of the first timed round's first optimizer step
(its generation included) to the end of training, over E / 2 episodes (default: 128 episodes = one pass over the 64
prompts, prompts 32-63 timed). Prompts are read in file order (shuffle_dataset False; before 2026-12-03 this script
kept TRL's seeded shuffle) so that ppo.py's grpo and rloo runs train on the same prompts in the same rounds.

GRPO settings against ours (`ppo.py --advantage grpo`): advantages (score - group mean) / (group std + 1e-4) in both
(TRL scale_rewards "group"; ours group_std true); the KL to the reference a loss term, k3 per token x 0.05, in both;
clip 0.2 and gradient-norm clip 1.0 in both. Loss aggregation: TRL's default loss_type "dapo" is token-level
(every completion token of the batch weighs the same); ours defaults to loss_agg token_mean, the same aggregation
(`--loss-agg seq_mean` in ppo.py is the GRPO paper's per-response mean, TRL's loss_type "grpo"). TRL's own choices
are kept: its fused LM head projects only the completion positions through the vocabulary head (ours does too);
the rollout's old log-probs come from one extra no-grad forward (TRL does it whenever a round is trained on > 1
time; ours always). Against ppo.py's default gae it does less work per episode: no value model.
`mean_padded_length` in the output says how long the timed rounds' left-padded rows were.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.trl_online import check_episodes, online_parser, run_trl_online  # noqa: E402


def main() -> None:
    parser = online_parser()
    args = parser.parse_args()
    check_episodes(parser, args.episodes, args.group)
    if args.group < 2:
        parser.error("GRPO needs --group >= 2")
    from trl import GRPOConfig, GRPOTrainer

    run_trl_online("trl-grpo", GRPOTrainer, GRPOConfig, args)


if __name__ == "__main__":
    main()
