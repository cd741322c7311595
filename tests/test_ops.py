"""Math tier: the shared tensor helpers against hand-computed values."""

import math

import torch

from core.ops import (
    entropy_from_logits,
    last_true_index,
    masked_mean,
    masked_var,
    masked_whiten,
    positions_from_mask,
    shifted_logprobs,
    token_logprobs,
)


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    # softmax([0, log 3]) = [1/4, 3/4]; softmax([2, 2]) = [1/2, 1/2]
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 2)]])
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    # temperature 2 halves the logits: softmax([0, log 3 / 2]) -> p1 = sqrt(3) / (1 + sqrt(3))
    expected_t = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    torch.testing.assert_close(token_logprobs(logits, tokens, 2.0)[0, 0], torch.tensor(expected_t))


def test_shifted_logprobs_mask_prompt_and_padding():
    logits = torch.zeros(1, 4, 4)  # uniform: every token has log-prob log(1/4)
    labels = torch.tensor([[-100, 2, 3, -100]])  # prompt, two completion tokens, padding
    logps, mask = shifted_logprobs(logits, labels)
    assert mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(logps, torch.tensor([[math.log(0.25), math.log(0.25), 0.0]]))


def test_masked_mean_var_whiten_by_hand_and_padding_is_ignored():
    x = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == 2.0  # (1 + 2 + 3) / 3; the inf in padding is never touched
    # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    assert masked_var(x, mask).item() == 1.0
    assert math.isclose(masked_var(x, mask, unbiased=False).item(), 2 / 3, rel_tol=1e-6)
    white = masked_whiten(x, mask)
    torch.testing.assert_close(white, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    torch.testing.assert_close(masked_mean(rows, torch.tensor([[1, 0], [1, 1]]), dim=1), torch.tensor([1.0, 6.0]))
    assert masked_mean(x, torch.zeros(4)).item() == 0.0  # nothing masked in: 0, not NaN


def test_entropy_and_last_index():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(4)), torch.tensor(math.log(4)))
    # right padding, left padding and an all-zero row
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert last_true_index(mask).tolist() == [1, 3, 0]


def test_positions_from_mask_left_and_right_padding():
    # cumsum - 1, clamped at 0: left [0,0,1,1,1] -> cumsum [0,0,1,2,3] -> [0,0,0,1,2];
    # right [1,1,1,0,0] -> cumsum [1,2,3,3,3] -> [0,1,2,2,2] (real tokens keep 0..n-1)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert positions_from_mask(mask.bool()).dtype == torch.long
