"""The critic-free workload of `benchmarks/ppo.py --advantage rloo` through TRL 1.16's RLOOTrainer, side by side.
Run it from a separate venv that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_rloo.py                  # 128 episodes, the last 64 timed
    /tmp/trlvenv/bin/python benchmarks/trl_rloo.py --episodes 32    # smoke run: 1 warm-up round, 1 timed

Workload and timed window as trl_grpo.py (benchmarks/trl_online.py): rounds of 16 completions (8 prompts x
group 2, RLOOConfig num_generations), each trained on 4 times (num_iterations 4, steps_per_generation 1), beta
0.05, max_completion_length 64, temperature 1, prompts in file order; `--episodes E` runs E / 16 rounds and times
the second half (from the first timed round's first optimizer step, its generation included, to the end of
training; E / 2 episodes).

RLOO settings against ours (`ppo.py --advantage rloo`): the reward is the score - 0.05 x the completion's summed
k1 KL (log pi_old - log pi_ref) in both (TRL's KL is a reward penalty here, not a loss term); the advantage is the
reward minus the mean reward of the other completions of its prompt in both; no advantage normalisation in either
(TRL normalize_advantages False). What differs: TRL 1.16's RLOO loss takes one importance ratio per completion
(exp of the summed token log-ratio), clipped at 0.2, and averages over completions; ours clips a ratio per token
and aggregates by loss_agg (token_mean by default; `--loss-agg seq_mean` averages per completion first, the closer
of the two). The forwards, backwards and optimizer steps are the same in number and size, so the rates compare;
the gradients do not match exactly.
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
        parser.error("RLOO needs --group >= 2")
    from trl import RLOOConfig, RLOOTrainer

    run_trl_online("trl-rloo", RLOOTrainer, RLOOConfig, args, normalize_advantages=False)


if __name__ == "__main__":
    main()
