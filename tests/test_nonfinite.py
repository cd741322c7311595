"""Non-finite guard: a NaN/inf loss, gradient norm, logits or weights stop every stage at the step it happens,
before the weights, a checkpoint or the Hugging Face export take it."""

import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from core.generation import SamplingSpec, sample_next
from core.guard import NonFiniteError, grad_norm, nonfinite_names
from core.optim import keep_trainable
from tests.conftest import ROOT

STAGES = ["sft", "reward", "dpo", "rs", "ppo"]


def test_grad_norm_is_the_global_l2_norm_and_skips_missing_grads():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # sqrt(9 + 16) = 5; c has none
    assert grad_norm([a, b, c]).item() == 5.0
    b.grad = torch.tensor([float("nan"), 0.0])
    assert math.isnan(grad_norm([a, b]).item())
    assert grad_norm([c]).item() == 0.0


def test_nonfinite_names_lists_the_first_bad_tensors():
    named = [("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")])), ("c", torch.tensor([float("nan")]))]
    assert nonfinite_names(named) == ["b", "c"]
    assert nonfinite_names(named, limit=1) == ["b"]


def test_a_checkpoint_with_nonfinite_weights_is_refused():
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight[0, 1] = float("nan")
    checkpoint = {"state_dict": dict(module.state_dict()), "global_step": 7}
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(weight\) at step 7: checkpoint not written"):
        keep_trainable(module, checkpoint)


def test_sampling_from_nonfinite_logits_raises_instead_of_drawing_garbage():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    with pytest.raises(NonFiniteError, match="logits while sampling"):
        sample_next(logits, SamplingSpec(temperature=1.0))
    with pytest.raises(NonFiniteError):
        sample_next(logits, SamplingSpec(temperature=0.0))  # greedy too: argmax of NaN is meaningless


def digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("stage", STAGES)
def test_a_diverging_run_stops_at_the_step_and_keeps_the_good_model(stage, run_recipe, tmp_path):
    config = f"configs/{stage}/tiny.yaml"
    out = tmp_path / "model"
    run_recipe(stage, "fit", "--config", config, f"--model.save_dir={out}", "--trainer.max_steps=1")
    good = digest(out)
    with pytest.raises(NonFiniteError) as err:
        run_recipe(stage, "fit", "--config", config, f"--model.save_dir={out}", "--trainer.max_steps=20",
                   "--model.optimizer.init_args.lr=1e6", "--checkpoint.every_n_train_steps=1")
    message = str(err.value)
    assert message.startswith(f"{stage}: non-finite ") and "optimizer step" in message, message
    assert digest(out) == good  # the export was never written from the diverged model
    last = sorted((tmp_path / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert str(last) in message
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_the_rlhf_command_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "sft", "fit", "--config", "configs/sft/tiny.yaml",
         "--model.optimizer.init_args.lr=1e6", f"--model.save_dir={tmp_path / 'model'}",
         f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sft: non-finite loss (nan) at optimizer step ")
    assert "saved policy" not in proc.stdout and not (tmp_path / "model").exists()
