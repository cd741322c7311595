"""OptimSpec (core/optim.py): the built-in LR schedules are transformers' (warm-up s / warmup_steps, 0 at step 0),
an injected scheduler wins, only trainable parameters are optimised, and a restored schedule continues exactly."""

import math

import pytest
import torch

from core.optim import OptimSpec


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)  # lr 1: the LR read back is the schedule's factor


def lrs(spec: OptimSpec, total: int, steps: int) -> list[float]:
    """The LR at scheduler steps 0 .. steps-1 (one optimizer step between them, as Lightning steps it)."""
    param = torch.nn.Parameter(torch.zeros(1))
    config = spec.configure([param], total)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_constant_warms_up_linearly_from_zero_then_holds():
    # warmup 4: step s runs at s / 4 -> 0, 0.25, 0.5, 0.75, then 1 from step 4 on
    assert lrs(OptimSpec(sgd, warmup_steps=4, decay="constant"), 10, 7) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lrs(OptimSpec(sgd), 10, 3) == [1.0, 1.0, 1.0]  # no warm-up: the full LR from the first step


def test_linear_decays_to_zero_at_the_last_step():
    # warmup 2, total 6: 0/2, 1/2, then (6 - s) / (6 - 2) -> 1, 0.75, 0.5, 0.25 and 0 at step 6
    assert lrs(OptimSpec(sgd, warmup_steps=2, decay="linear"), 6, 7) == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_cosine_follows_half_a_cosine_after_warm_up():
    # warmup 2, total 6: progress p = (s - 2) / 4, factor 0.5 * (1 + cos(pi * p))
    expected = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert lrs(OptimSpec(sgd, warmup_steps=2, decay="cosine"), 6, 7) == pytest.approx(expected, abs=1e-12)


def test_an_injected_scheduler_replaces_the_built_in_one():
    halve = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    assert lrs(OptimSpec(sgd, halve, warmup_steps=4, decay="linear"), 10, 3) == [1.0, 0.5, 0.25]


def test_only_trainable_parameters_are_optimised():
    trained, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer = OptimSpec(sgd).configure([trained, frozen], 5)["optimizer"]
    assert [p for group in optimizer.param_groups for p in group["params"]] == [trained]


def test_a_restored_schedule_continues_where_it_stopped():
    spec = OptimSpec(sgd, warmup_steps=2, decay="cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    first = spec.configure([param], 8)
    for _ in range(3):
        first["optimizer"].step()
        first["lr_scheduler"]["scheduler"].step()
    state = first["lr_scheduler"]["scheduler"].state_dict(), first["optimizer"].state_dict()
    resumed = spec.configure([param], 8)  # a resume rebuilds both, then Lightning loads their state
    resumed["lr_scheduler"]["scheduler"].load_state_dict(state[0])
    resumed["optimizer"].load_state_dict(state[1])
    # step 3 of warmup 2, total 8: p = 1 / 6
    expected = 0.5 * (1 + math.cos(math.pi / 6))
    assert resumed["optimizer"].param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
    assert resumed["lr_scheduler"]["scheduler"].get_last_lr() == first["lr_scheduler"]["scheduler"].get_last_lr()


def test_an_unknown_decay_is_refused():
    with pytest.raises(ValueError, match="decay must be one of constant, linear, cosine, got 'step'"):
        OptimSpec(sgd, decay="step").configure([torch.nn.Parameter(torch.zeros(1))], 5)
