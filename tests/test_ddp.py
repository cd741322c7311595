"""Every stage under DDP on 2 CPU processes (gloo), checked against what must agree with 1 process.

sft, reward, dpo: 2 processes x batch B against 1 process x batch 2B. EpochSampler is a DistributedSampler (rank r
takes every 2nd index of one seeded permutation), so one global batch holds the same examples either way, and DDP's
mean of the ranks' gradients is the 1-process gradient when each rank's loss is its share of the global mean (pairs:
equal counts per rank; SFT: a token sum scaled by world_size / tokens on all ranks). Compared per step: the logged
train metrics (1 process vs the mean over ranks); validation before and after training; the final weights.

Tolerances: the 2-process gradient is two half-batch sums added by the all-reduce, float32 in another order, so
values differ in the last bits (~1e-7 relative). Losses and val metrics: rtol 1e-5, atol 1e-6 (seen: <= 2e-7
relative, 6e-8 absolute). Weights: Adam divides each gradient element by its running RMS, which blows that noise
up where an element's gradient is ~0 (seen: 7e-6 absolute after 3 steps at lr 3e-3), so the updates are compared
as one vector: |dW_2 - dW_1| <= 1e-3 |dW_1| (seen: 4e-6 to 2e-5; SFT with a per-rank token mean gave 5e-2).
Accuracies are left out: a near-tie may flip on that noise.

rs, ppo sample with per-rank generator streams (seed + rank), so their samples differ from 1 process by design.
Checked: the weights are identical on both ranks (gradients are all-reduced); the adaptive KL coefficient is one
value on both ranks, the controller fed the KL pooled over all responses with n_steps = batch * world_size;
validation metrics are pooled over the ranks.

Validation reads a 31-row file: Lightning's sampler pads it to 32 and counts row 0 twice; EvalSampler does not,
so each metric's weight summed over ranks is the 1-process one (rows, or their tokens).
Per-rank values come from tests/ddp_probe.py, added to the real CLI with --trainer.callbacks+=.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.losses.kl_control import AdaptiveKLController
from tests.conftest import ROOT, SYNTHETIC

VAL_ROWS = 31
VAL_FILE = {"sft": "sft_val.jsonl", "reward": "pairs_val.jsonl", "dpo": "pairs_val.jsonl", "rs": "prompts_val.jsonl",
            "ppo": "prompts_val.jsonl"}
BATCH = {"sft": 16, "reward": 8, "dpo": 8}  # per process in the tiny configs
TRAIN_KEYS = {"sft": ("train/loss",), "reward": ("train/loss", "train/rewards/margins"),
              "dpo": ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                      "train/logps/chosen", "train/logps/rejected")}


def _start(stage: str, out: Path, devices: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Launch `rlhf <stage> fit` on its tiny config with the probe; outputs and probe dumps under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    val = out / "val.jsonl"  # an odd number of rows: padding would show
    val.write_text("".join((SYNTHETIC / VAL_FILE[stage]).read_text().splitlines(keepends=True)[:VAL_ROWS]))
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_PROBE_DIR=str(out / "probe"))
    strategy = ["--trainer.strategy=ddp"] if devices > 1 else []
    cmd = [sys.executable, "-m", "recipes.cli", stage, "fit", "--config", f"configs/{stage}/tiny.yaml",
           "--trainer.accelerator=cpu", f"--trainer.devices={devices}", *strategy, f"--data.val_file={val}",
           f"--model.save_dir={out / 'hf'}", f"--trainer.default_root_dir={out}",
           f"--trainer.logger.init_args.save_dir={out}", "--trainer.callbacks+=tests.ddp_probe.Probe", *extra]
    log = out / "log.txt"
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env), log


def _finish(proc: subprocess.Popen, log: Path, ranks: int) -> list[dict]:
    """Wait for a run; its per-rank probe dumps."""
    rc = proc.wait(timeout=300)
    assert rc == 0, log.read_text()[-3000:]
    assert (log.parent / "hf" / "config.json").exists()
    return [torch.load(log.parent / "probe" / f"rank{r}.pt") for r in range(ranks)]


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=atol)


def _update_gap(one: dict, two: dict) -> float:
    """|dW_2 - dW_1| / |dW_1| over all trainable weights, dW = end - start."""
    gap = sum((two["weights"][k] - one["weights"][k]).double().square().sum() for k in one["weights"])
    update = sum((one["weights"][k] - one["start"][k]).double().square().sum() for k in one["weights"])
    return float((gap / update).sqrt())


def _ranks_identical(ranks: list[dict]) -> None:
    first = ranks[0]["weights"]
    assert first and all(torch.equal(first[k], r["weights"][k]) for r in ranks[1:] for k in first)


def _pooled_val(ranks: list[dict]) -> None:
    """Each logged val metric is the pooled mean of every rank's local (sum, weight); every row counted once."""
    for records in zip(*(r["val"] for r in ranks)):
        for name in records[0]["local"]:
            total = sum(rec["local"][name][0] for rec in records)
            weight = sum(rec["local"][name][1] for rec in records)
            assert weight == VAL_ROWS, name  # per-row metrics: 16 + 15 rows, no repeated row
            # val_metrics.kl -> val/kl, val_reward -> val/reward
            logged = "val/" + name.split(".")[-1].removeprefix("val_")
            for rec in records:
                _close(rec["logged"][logged], total / weight)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_processes_match_one_with_the_same_global_batch(stage, tmp_path):
    steps = ["--trainer.max_steps=3", "--trainer.val_check_interval=3"]  # validation before (sanity) and after
    two = _start(stage, tmp_path / "two", 2, *steps)
    one = _start(stage, tmp_path / "one", 1, *steps, f"--data.batch_size={2 * BATCH[stage]}")
    ranks, (single,) = _finish(*two, ranks=2), _finish(*one, ranks=1)

    assert len(single["steps"]) == len(ranks[0]["steps"]) == 3
    for s, row in enumerate(single["steps"]):
        for key in TRAIN_KEYS[stage]:  # equal shares per rank: the global value is the mean over ranks
            _close(sum(r["steps"][s][key] for r in ranks) / 2, row[key])
    assert len(single["val"]) == len(ranks[0]["val"]) == 2
    for one_val, *two_val in zip(single["val"], *(r["val"] for r in ranks)):
        for name, (_, weight) in one_val["local"].items():  # every row (token) once over the ranks
            assert sum(v["local"][name][1] for v in two_val) == weight, name
        for key, value in one_val["logged"].items():
            if "accura" not in key:
                for v in two_val:
                    _close(v["logged"][key], value)
    _ranks_identical(ranks)
    assert _update_gap(single, ranks[0]) <= 1e-3


@pytest.mark.slow
def test_rejection_sampling_ranks_agree(tmp_path):
    ranks = _finish(*_start("rs", tmp_path, 2, "--trainer.max_steps=2", "--trainer.limit_val_batches=1.0"), ranks=2)
    _ranks_identical(ranks)
    assert len(ranks[0]["val"]) == 2  # sanity check and after step 2
    _pooled_val(ranks)


@pytest.mark.slow
def test_ppo_ranks_agree_and_share_one_kl_controller(tmp_path):
    # 3 rollouts (2 optimizer steps each); KL target near the measured KL, so the error is not always clipped
    ranks = _finish(*_start("ppo", tmp_path, 2, "--trainer.max_steps=6", "--trainer.limit_val_batches=1.0",
                            "--model.adaptive_kl=true", "--model.kl_target=0.1", "--model.kl_horizon=64"), ranks=2)
    _ranks_identical(ranks)
    assert len(ranks[0]["val"]) == 1  # after rollout 2
    _pooled_val(ranks)
    # one controller: fed the mean KL over both ranks' 8 responses each, n_steps = 8 * 2 responses
    expected = AdaptiveKLController(0.05, target=0.1, horizon=64)
    assert len(ranks[0]["steps"]) == 3
    for s, (a, b) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        assert a["kl_ctl"] == b["kl_ctl"], s
        expected.update((a["train/kl"] + b["train/kl"]) / 2, n_steps=16)
        _close(a["kl_ctl"], expected.value, rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_shared_prompt_layout_under_ddp(stage, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", stage, "fit", "--config", f"configs/{stage}/tiny.yaml",
         "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=4",
         f"--model.save_dir={tmp_path / 'hf'}", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.share_prompt=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").exists()
