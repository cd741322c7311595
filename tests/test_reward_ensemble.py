"""RewardSpec with a reward-model ensemble: members combined by mean / min / mean - lambda * std, then used as
one model in the weighted sum; a folder of member folders stands for its members; nonsensical settings refused."""

import pytest
import torch

from core.models import ModelSpec, save_hf
from core.reward_spec import RewardSpec, as_reward_spec
from modules.reward import RewardModule
from tests.conftest import TINY_MODEL

PROMPT = "Reverse: a b c\nAnswer:"
RESPONSES = [" c b a", " a b c", " c b"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny reward models with different random heads, saved as <parent>/member_k."""
    parent = tmp_path_factory.mktemp("ensemble")
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        module = RewardModule(ModelSpec(path=str(TINY_MODEL)))
        module.configure_model()
        torch.nn.init.normal_(module.backbone.score.weight)
        save_hf(module.backbone, module.tokenizer, parent / f"member_{seed}")
    return parent


def _score(**kw):
    return RewardSpec(**kw).load("cpu").score([PROMPT] * 3, RESPONSES)


def test_ensemble_equals_members_combined_by_hand(members):
    paths = [{"path": str(members / f"member_{k}")} for k in range(3)]
    a, b, c = (_score(models=[p]) for p in paths)  # each member alone, (3,) each
    assert not torch.allclose(a, b) and not torch.allclose(b, c)  # the members really differ
    mean = (a + b + c) / 3
    std = (((a - mean) ** 2 + (b - mean) ** 2 + (c - mean) ** 2) / 3).sqrt()  # population std over 3 members
    spec = RewardSpec(models=paths, ensemble="mean").load("cpu")
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), mean)
    spec.ensemble = "min"  # same loaded members, other rules
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), torch.minimum(torch.minimum(a, b), c))
    spec.ensemble, spec.ensemble_lambda = "mean_minus_std", 0.5
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), mean - 0.5 * std)
    # the ensemble is ONE scorer in the weighted sum: weights [ensemble, oracle]
    spec = RewardSpec(models=paths, ensemble="mean", oracle="synthetic", weights=[2.0, 0.5]).load("cpu")
    oracle = torch.tensor([1.0, 1 / 3, 2 / 3])  # " c b a" all right, " a b c" the middle b, " c b" 2 of 3
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), 2.0 * mean + 0.5 * oracle)


def test_parent_folder_stands_for_its_member_folders(members):
    (members / "notes").mkdir(exist_ok=True)  # not a saved model: left out
    spec = as_reward_spec({"models": [{"path": str(members), "dtype": "float32"}], "ensemble": "min"})
    assert [m.path for m in spec.models] == [str(members / f"member_{k}") for k in range(3)]
    alone = [_score(models=[m]) for m in spec.models]
    expected = torch.stack(alone).min(0).values
    torch.testing.assert_close(spec.load("cpu").score([PROMPT] * 3, RESPONSES), expected)
    assert [m.path for m in RewardSpec(models=[str(members / "member_0")]).models] == [str(members / "member_0")]


def test_nonsensical_ensembles_are_refused():
    two = [ModelSpec(path="a"), ModelSpec(path="b")]
    with pytest.raises(ValueError, match="combine='llama2' needs separate models"):
        RewardSpec(models=two, combine="llama2", ensemble="mean")
    with pytest.raises(ValueError, match="two or more models"):
        RewardSpec(models=two[:1], ensemble="min")
    with pytest.raises(ValueError, match="two or more models"):
        RewardSpec(oracle="synthetic", ensemble="mean")
    with pytest.raises(ValueError, match="3 weights for one ensemble of 2 models"):
        RewardSpec(models=two, ensemble="mean", weights=[1.0, 1.0, 1.0])  # one weight for the ensemble
    with pytest.raises(ValueError, match="1 weights for one ensemble of 2 models"):
        RewardSpec(models=two, ensemble="mean", oracle="synthetic", weights=[1.0])
    with pytest.raises(ValueError, match="ensemble_lambda"):
        RewardSpec(models=two, ensemble="mean_minus_std", ensemble_lambda=-1.0)
    with pytest.raises(ValueError, match="ensemble must be"):
        RewardSpec(models=two, ensemble="median")
    assert RewardSpec(models=two, ensemble="mean", oracle="synthetic", weights=[1.0, 0.1]).weights == [1.0, 0.1]
    assert RewardSpec(models=two, weights=[1.0, 2.0]).ensemble == "none"  # without an ensemble: one weight each
