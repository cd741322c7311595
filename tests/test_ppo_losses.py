"""Hand-checked tests for core/losses/ppo.py and core/losses/kl_control.py."""

import ast
import copy
import math
import pathlib

import pytest
import torch

from core.losses.kl_control import AdaptiveKLController, FixedKLController
from core.losses.ppo import (
    PPOLossOutput,
    entropy_bonus,
    gae,
    kl_estimate,
    policy_loss,
    ppo_loss,
    shape_scores,
    token_rewards,
    value_loss,
    whiten_advantages,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ---------------------------------------------------------------- KL estimators and rewards


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.7]), torch.tensor([-1.5, -1.0, -0.7])
    close(kl_estimate(logp, ref, "k1"), [-1.0 + 1.5, -2.0 + 1.0, 0.0])
    # k3 = (r - 1) - log r with r = exp(ref - logp)
    r0, r1 = math.exp(-1.5 + 1.0), math.exp(-1.0 + 2.0)
    close(kl_estimate(logp, ref, "k3"), [(r0 - 1) - math.log(r0), (r1 - 1) - math.log(r1), 0.0])
    close(kl_estimate(logp, ref, "abs"), [0.5, 1.0, 0.0])
    close(kl_estimate(logp, ref, "mse"), [0.5 * 0.5**2, 0.5 * 1.0**2, 0.0])
    assert (kl_estimate(torch.randn(50), torch.randn(50), "k3") >= 0).all()  # k3 is never negative
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_shape_scores_penalty_then_clip():
    scores, has_eos = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([True, False, False])
    close(shape_scores(scores, has_eos), [1.0, 2.0, -3.0])
    # rows 1 and 2 lack EOS: 2.0 - 1.5 = 0.5 and -3.0 - 1.5 = -4.5, which clips to -2.0
    close(shape_scores(scores, has_eos, missing_eos_penalty=1.5, clip=2.0), [1.0, 0.5, -2.0])
    close(shape_scores(scores, has_eos, clip=2.0), [1.0, 2.0, -2.0])


def test_token_rewards_score_on_last_real_token_only():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # row 0 hit EOS at position 1
    logp = torch.tensor([[-1.0, -2.0, 99.0, -50.0], [-0.5, -0.5, -0.5, -0.5]])  # row 0 pads: garbage
    ref = torch.tensor([[-1.5, -1.0, 7.0, 3.0], [-1.0, -0.5, -0.25, -0.5]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [0.5, 0.0, -0.25, 0.0]])
    # rewards = -0.1 * kl; score 2.0 at (0, 1), score -1.0 at (1, 3); nothing on row 0's padding
    close(rewards, [[-0.1 * 0.5, -0.1 * -1.0 + 2.0, 0.0, 0.0],
                    [-0.1 * 0.5, 0.0, -0.1 * -0.25, 0.0 - 1.0]])
    # k3 on garbage padding (exp(99 + 50) overflows) stays finite and zero there
    rewards3, kl3 = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, 0.1, "k3")
    assert torch.isfinite(rewards3).all() and (kl3[0, 2:] == 0).all() and (rewards3[0, 2:] == 0).all()
    # an all-padding row receives no score at all
    empty, _ = token_rewards(torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)
    close(empty, [[0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- GAE


def test_gae_by_hand_with_padded_row():
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.5, 1.0], [0.3, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.25, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=g, lam=lam)
    # row 0: V past the last token is 0
    d2 = 1.0 + g * 0.0 - 0.6  # 0.4
    d1 = 0.5 + g * 0.6 - 0.4  # 0.64
    d0 = 0.0 + g * 0.4 - 0.2  # 0.16
    a2 = d2  # 0.4
    a1 = d1 + g * lam * a2  # 0.64 + 0.72 * 0.4 = 0.928
    a0 = d0 + g * lam * a1  # 0.16 + 0.72 * 0.928 = 0.82816
    # row 1 ends at position 1
    e1 = 1.0 + g * 0.0 - 0.25  # 0.75
    e0 = 0.3 + g * 0.25 - 0.5  # 0.025
    b1, b0 = e1, e0 + g * lam * e1  # 0.75, 0.565
    close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    close(ret, [[a0 + 0.2, a1 + 0.4, a2 + 0.6], [b0 + 0.5, b1 + 0.25, 0.0]])


def test_gae_padding_garbage_changes_nothing_and_no_grad():
    rewards = torch.tensor([[0.3, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    junk_r = torch.tensor([[0.3, 1.0, 1e6, -7.0]])
    junk_v = torch.tensor([[0.5, 0.25, -1e6, float("inf")]])
    adv2, ret2 = gae(junk_r, junk_v, mask, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_gamma_lam_one_is_monte_carlo():
    rewards, values = torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(ret, [[0.0 + 0.5 + 1.0, 0.5 + 1.0, 1.0]])  # returns are the reward-to-go
    close(adv, [[1.5 - 0.2, 1.5 - 0.4, 1.0 - 0.6]])


def test_whiten_advantages_over_real_tokens():
    out = whiten_advantages(torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1, 1, 1, 0]]))
    # mean 2, unbiased var ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    close(out, [[-1.0, 0.0, 1.0, 0.0]])


# ---------------------------------------------------------------- policy / value / entropy


def _policy_inputs():
    # row 0: (A=+1, r=1.1 inside), (A=+1, r=1.5 above), (A=-2, r=0.5 below); row 1: (A=-1, r=1.5), (A=+1, r=0.5), pad
    ratios = torch.tensor([[1.1, 1.5, 0.5], [1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])
    logp = (old + ratios.log()).clone()
    logp[1, 2] = 1e4  # garbage on padding: exp(1e4 + 2) overflows if it leaks
    adv = torch.tensor([[1.0, 1.0, -2.0], [-1.0, 1.0, 123.0]])
    return logp, old, adv, torch.tensor([[1, 1, 1], [1, 1, 0]]), ratios


def test_policy_loss_clipping_by_hand_and_grads():
    logp, old, adv, mask, ratios = _policy_inputs()
    logp, old, adv = (x.requires_grad_() for x in (logp, old, adv))
    out = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clamp(r, 0.8, 1.2)) per token:
    # a: max(-1.1, -1.1) = -1.1 (unclipped)     b: max(-1.5, -1.2) = -1.2 (clipped active)
    # c: max(2*0.5, 2*0.8) = 1.6 (clipped)      d: max(1.5, 1.2) = 1.5 (unclipped)
    # e: max(-0.5, -0.8) = -0.5 (unclipped)
    close(out.loss, (-1.1 - 1.2 + 1.6 + 1.5 - 0.5) / 5)
    close(out.clipfrac, 2 / 5)
    lr = ratios.log()
    close(out.approxkl, 0.5 * (lr[0, 0]**2 + lr[0, 1]**2 + lr[0, 2]**2 + lr[1, 0]**2 + lr[1, 1]**2) / 5)
    assert not out.clipfrac.requires_grad and not out.approxkl.requires_grad
    out.loss.backward()
    assert old.grad is None and adv.grad is None  # gradient reaches logp only
    # d/dlogp(-A r) = -A r on unclipped tokens, 0 on clipped ones and on padding; / 5 real tokens
    close(logp.grad, [[-1.1 / 5, 0.0, 0.0], [1.5 / 5, -0.5 / 5, 0.0]])


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[0.5, 0.5, 0.9, 1e30]], requires_grad=True)  # last position is padding
    old, ret = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 2.0, -5.0]])
    old.requires_grad_()
    ret.requires_grad_()
    out = value_loss(values, old, ret, torch.tensor([[1, 1, 1, 0]]), clip_eps=0.2)
    # t0: v_clip = 0 + 0.2; (0.5-1)^2 = 0.25 < (0.2-1)^2 = 0.64 -> 0.64 (clipped active)
    # t1: v_clip = 0.2; (0.5-0)^2 = 0.25 > 0.2^2 = 0.04 -> 0.25
    # t2: 0.9 is inside [0.8, 1.2]; both (0.9-2)^2 = 1.21
    close(out.loss, 0.5 * (0.64 + 0.25 + 1.21) / 3)
    close(out.clipfrac, 1 / 3)
    out.loss.backward()
    assert old.grad is None and ret.grad is None
    # t0 is clamped (no grad), t1: 0.5 * 2 (v - R) / 3, t2: 0.5 * 2 (0.9 - 2) / 3, padding 0
    close(values.grad, [[0.0, 0.5 / 3, -1.1 / 3, 0.0]])


def test_value_clipfrac_ignores_float_rounding():
    # v = old + one float32 ulp: far inside old +- 0.2, so nothing is clipped. Written as (old - R) + (v - old),
    # v_clip - R rounds away from v - R, e.g. old 0.2, R 0.7: 0.2f - 0.7f rounds to -0.5 and + 1.49e-8 stays
    # -0.5, while v - R = -0.49999997; (-0.5)^2 > 0.49999997^2 counted the token as clipped (clipfrac 1 here)
    old, ret = torch.tensor([[0.1, 0.2, 0.7, 1.1, -0.4]]), torch.tensor([[0.3, 0.7, -0.4, -0.3, 0.2]])
    values = torch.nextafter(old, torch.tensor(10.0))  # one ulp up
    mask = torch.ones(1, 5)
    out = value_loss(values, old, ret, mask, clip_eps=0.2)
    assert out.clipfrac.item() == 0.0
    close(out.loss, 0.5 * (values - ret).square().mean())  # the unclipped error everywhere
    assert value_loss(old, old, ret, mask, clip_eps=0.2).clipfrac.item() == 0.0  # v == old exactly
    # the same tokens plus one clearly clipped: old 0, v 0.5 -> v_clip 0.2, R 1: 0.64 > 0.25, so 1 of 6
    out = value_loss(torch.cat([values, torch.tensor([[0.5]])], -1), torch.cat([old, torch.tensor([[0.0]])], -1),
                     torch.cat([ret, torch.tensor([[1.0]])], -1), torch.ones(1, 6), clip_eps=0.2)
    assert out.clipfrac.item() == pytest.approx(1 / 6)


def test_entropy_bonus_uniform_and_masked():
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # padding: near-zero entropy if it leaked
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(entropy_bonus(logits, mask), math.log(4))
    two = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    close(entropy_bonus(two, torch.ones(1, 1)), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_ppo_loss_combination():
    mask = torch.tensor([[1, 0]])
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    entropy = torch.tensor(math.log(4.0), requires_grad=True)
    out = ppo_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 9.0]]), torch.tensor([[0.5, 9.0]]),
                   torch.zeros(1, 2), torch.tensor([[1.0, 9.0]]), mask, entropy,
                   clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.01)
    assert isinstance(out, PPOLossOutput)
    pg = -1.0 * 1.2  # r = 1.5 clipped to 1.2 with A = 1
    vf = 0.5 * (0.2 - 1.0) ** 2  # v = 0.5 clipped to 0.2 around old 0, R = 1: 0.5 * 0.64 = 0.32
    close(out.policy_loss, pg)
    close(out.value_loss, vf)
    close(out.loss, pg + 0.1 * vf - 0.01 * math.log(4.0))
    close(out.clipfrac, 1.0)
    close(out.value_clipfrac, 1.0)
    close(out.approxkl, 0.5 * math.log(1.5) ** 2)
    assert all(not x.requires_grad for x in out[1:])
    out.loss.backward()
    close(entropy.grad, -0.01)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_two_updates_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)  # 12/6 - 1 = 1 -> clipped to 0.2
    v1 = 0.2 * (1 + 0.2 * 256 / 10000)  # 0.201024
    close(ctl.value, v1)
    ctl.update(torch.tensor(5.4), n_steps=256)  # 5.4/6 - 1 = -0.1, inside the clip
    close(ctl.value, v1 * (1 - 0.1 * 256 / 10000))
    low = AdaptiveKLController(0.2, 6.0, 10000)
    low.update(0.0, 100)  # 0/6 - 1 = -1 -> clipped to -0.2
    close(low.value, 0.2 * (1 - 0.2 * 100 / 10000))


def test_fixed_kl_controller_and_state_dict_round_trip():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(12.0, 256)
    state = copy.deepcopy(ctl.state_dict())
    assert all(isinstance(v, float) for v in state.values())  # plain Python: safe in a checkpoint
    resumed = AdaptiveKLController(0.2, 6.0, 10000)
    resumed.load_state_dict(state)
    for kl in (3.0, 7.5):
        ctl.update(kl, 64)
        resumed.update(kl, 64)
    assert resumed.value == ctl.value
    fresh = FixedKLController(1.0)
    fresh.load_state_dict(fixed.state_dict())
    assert fresh.value == 0.05


def test_ppo_losses_import_only_torch_and_stdlib():
    import sys

    for name in ("ppo.py", "kl_control.py"):
        path = pathlib.Path(__file__).parents[1] / "core" / "losses" / name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for mod in mods:
                    top = mod.split(".")[0]
                    assert top in {"torch", "core"} or top in sys.stdlib_module_names, (name, mod)
                    assert top != "core" or mod == "core.ops", (name, mod)
