"""`rlhf report`: metrics.csv columns grouped by concept whatever their names, eval bars, a self-contained report."""

import json
import re

import pytest

pytest.importorskip("matplotlib")

from recipes.cli import main as rlhf  # noqa: E402
from recipes.report import group, labelled, read_metrics, split_name  # noqa: E402

OLD = ["train/loss", "rewards/accuracies", "objective/kl", "objective/scores", "val/score", "val/kl"]
NEW = ["train/loss", "val/loss", "train/reward", "val/reward", "train/kl", "val/kl", "train/rewards/accuracies",
       "val/rewards/accuracies", "train/response_length", "val/response_length", "train/kl_coef", "lr-AdamW"]


def write_csv(path, columns, steps=12, val_every=4):
    """CSVLogger's layout: train rows each step, val rows every few steps with only val/ columns filled."""
    path.parent.mkdir(parents=True)
    lines = [",".join(["epoch", "step", *columns])]
    for step in range(steps):
        rows = [[c for c in columns if not c.startswith("val/")]]
        if step % val_every == val_every - 1:
            rows.append([c for c in columns if c.startswith("val/")])
        for filled in rows:
            lines.append(",".join(["0", str(step), *(f"{(i + 1) * 0.1 + step * 0.01:.3f}" if c in filled else ""
                                                     for i, c in enumerate(columns))]))
    path.write_text("\n".join(lines) + "\n")


def write_eval(path, wins, ties, losses):
    n, rate = wins + ties + losses, (wins + ties / 2) / (wins + ties + losses)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "policy": {"score": {"mean": 0.8, "low": 0.75, "high": 0.85, "stderr": 0.025, "n": n}},
        "baseline": {"score": {"mean": 0.6, "low": 0.52, "high": 0.68, "stderr": 0.04, "n": n}},
        "win_rate": {"win_rate": rate, "low": rate - 0.07, "high": rate + 0.07, "wins": wins, "ties": ties,
                     "losses": losses, "n": n},
        "kl": {"kl": 1.2, "stderr": 0.1, "low": 1.0, "high": 1.4, "n": n}, "confidence": 0.95}))


def test_concepts_from_old_and_new_names(tmp_path):
    write_csv(tmp_path / "ppo" / "version_0" / "metrics.csv", OLD)
    write_csv(tmp_path / "rs" / "version_0" / "metrics.csv", NEW)
    assert split_name("val/rewards/accuracies") == ("val", "rewards/accuracies")
    assert (split_name("objective/kl") == ("train", "objective/kl")
            and split_name("train/loss_step") == ("train", "loss"))
    found = labelled(sorted(tmp_path.rglob("metrics.csv")))
    assert [label for label, _ in found] == ["ppo", "rs"]
    metrics = {label: read_metrics(path) for label, path in found}
    assert metrics["rs"]["val/kl"] == [(3.0, 0.63), (7.0, 0.67), (11.0, 0.71)]  # only the rows that carry it
    assert set(group(metrics, "kl")) == {"objective/kl", "kl"}
    assert set(group(metrics, "accuracy")) == {"rewards/accuracies"}
    assert set(group(metrics, "reward")) == {"objective/scores", "score", "reward"}
    assert set(group(metrics, "length")) == {"response_length"}
    assert {(run, split) for run, split, _ in group(metrics, "loss")["loss"]} == {("ppo", "train"), ("rs", "train"),
                                                                                 ("rs", "val")}


def test_report_plots_runs_and_evals(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_csv(runs / "logs" / "dpo" / "version_0" / "metrics.csv", OLD)
    write_csv(runs / "logs" / "ppo" / "version_0" / "metrics.csv", NEW)
    write_eval(runs / "eval" / "dpo" / "eval.json", 110, 30, 60)
    write_eval(runs / "eval" / "ppo" / "eval.json", 140, 20, 40)
    out = tmp_path / "report"
    # a stage folder, a version folder and a folder of evals
    assert rlhf(["report", str(runs / "logs" / "dpo"), str(runs / "logs" / "ppo" / "version_0"), str(runs / "eval"),
                 "--out", str(out)]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"loss.png", "reward.png", "kl.png", "accuracy.png", "length.png", "eval.png"}
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", md) == ["reward.png", "kl.png", "accuracy.png", "loss.png",
                                                        "length.png", "eval.png"]
    assert "| dpo | 0.625 [0.555, 0.695] | 110 / 30 / 60 |" in md
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://|//cdn|<script", page)
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(pngs)
    assert "<td>ppo</td>" in page


def test_no_run_dir_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as err:
        rlhf(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert err.value.code == 2
