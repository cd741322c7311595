"""`rlhf report`: plots of runs' metrics.csv and eval.json files, in one report.md and report.html.

    rlhf report runs/quickstart/logs runs/quickstart/eval --out runs/quickstart/report

Each RUN_DIR is searched for CSVLogger files (`<stage>/version_N/metrics.csv`: a version folder, a stage folder or
a root holding several) and `rlhf eval` outputs (`eval.json`). Metrics are grouped by concept from their names,
whatever a stage calls them (`train/loss`, `val/kl`, `rewards/accuracies`, `objective/scores`, ...):
  loss, reward/score, KL, accuracy, response length   one PNG each: a panel per metric name, value vs step,
                                                      a colour per run, train solid, val dashed, test dotted
  eval                                                bars with 95% intervals: win rate vs the baseline
                                                      (Wilson), mean judge score of each side, KL to the reference
OUT gets the PNGs, report.md and report.html (self-contained: images by relative path, no scripts or URLs).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import sys
from pathlib import Path

PROG = "rlhf report"
# (concept, title, test on the metric name without its split); first match wins
CONCEPTS = [
    ("accuracy", "Accuracy", lambda n: "accura" in n),
    ("kl", "KL to the reference (nats)", lambda n: re.search(r"(^|[/_])kl($|[/_])", n) is not None
     and "approx" not in n and "coef" not in n),  # not PPO's policy-step KL nor the KL coefficient
    ("length", "Response length", lambda n: "length" in n),
    ("reward", "Reward / score", lambda n: "reward" in n or "score" in n),
    ("loss", "Loss", lambda n: "loss" in n),
]
ORDER = ("reward", "kl", "accuracy", "loss", "length")  # of the report's sections
SPLITS = ("train", "val", "test")
STYLES = {"train": "-", "val": "--", "test": ":"}
MAX_PANELS = 9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="folders holding metrics.csv / eval.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs, report.md and report.html")
    parser.add_argument("--title", default="rlhf report")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.exists()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    md = write_report(args.runs, args.out, args.title)
    print(f"{PROG}: wrote {md} and {md.with_suffix('.html')}", file=sys.stderr)


def write_report(roots: list[Path], out: Path, title: str = "rlhf report") -> Path:
    """Find, plot, write; returns OUT/report.md."""
    metrics = {label: read_metrics(path) for label, path in labelled(find(roots, "metrics.csv"))}
    evals = {label: json.loads(path.read_text()) for label, path in labelled(find(roots, "eval.json"))}
    if not metrics and not evals:
        print(f"{PROG}: no metrics.csv or eval.json under {', '.join(map(str, roots))}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    sections = []  # (title, png name or None, markdown text)
    for concept, heading, _ in sorted(CONCEPTS, key=lambda c: ORDER.index(c[0])):
        panels = group(metrics, concept)
        if panels:
            sections.append((heading, plot_metrics(panels, heading, out / f"{concept}.png"), ""))
    if evals:
        sections.append(("Evaluations", plot_evals(evals, out / "eval.png"), eval_table(evals)))
    md = out / "report.md"
    write_text(md, markdown(title, roots, list(metrics), sections))
    write_text(out / "report.html", page(title, roots, list(metrics), sections))
    return md


def find(roots: list[Path], name: str) -> list[Path]:
    paths = []
    for root in roots:
        paths += [root] if root.is_file() and root.name == name else sorted(root.rglob(name)) if root.is_dir() else []
    return list(dict.fromkeys(p.resolve() for p in paths))


def labelled(paths: list[Path]) -> list[tuple[str, Path]]:
    """A short unique label per file: its folder relative to all files' common folder, `/version_N` dropped where
    that stays unique (`ppo`, `dpo/version_1`)."""
    folders = [p.parent for p in paths]
    if len(folders) > 1:
        common = Path(os.path.commonpath(folders))
        names = [str(f.relative_to(common)) if f != common else f.name for f in folders]
    else:
        names = ["/".join(f.parts[-2:]) for f in folders]
    short = [re.sub(r"/?version_\d+$", "", n) or n for n in names]
    return [(s if short.count(s) == 1 else n, p) for s, n, p in zip(short, names, paths)]


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """metrics.csv -> {column: [(step, value)]} over the rows where the column has a finite number."""
    series: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = number(row.get("step"))
            step = float(i) if step is None else step
            for key, text in row.items():
                value = number(text)
                if key not in (None, "step", "epoch") and value is not None:
                    series.setdefault(key, []).append((step, value))
    # Lightning's on_step+on_epoch metrics: `x_step` is the curve; drop `x_epoch` next to it
    return {k: v for k, v in series.items() if not (k.endswith("_epoch") and k[: -len("_epoch")] + "_step" in series)}


def number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def split_name(column: str) -> tuple[str, str]:
    """`val/rewards/accuracies` -> ("val", "rewards/accuracies"); a name with no split prefix counts as train;
    Lightning's `_step` suffix is dropped."""
    head, _, rest = column.partition("/")
    head = "val" if head == "validation" else head
    split, name = (head, rest) if head in SPLITS and rest else ("train", column)
    return split, re.sub(r"_step$", "", name)


def group(metrics: dict, concept: str) -> dict[str, list[tuple[str, str, list]]]:
    """{metric name: [(run, split, points)]} for the columns of one concept."""
    panels: dict[str, list] = {}
    for run, series in metrics.items():
        for column, points in series.items():
            split, name = split_name(column)
            if next((c for c, _, t in CONCEPTS if t(name.lower())), None) == concept:
                panels.setdefault(name, []).append((run, split, sorted(points)))
    return dict(sorted(panels.items())[:MAX_PANELS])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(panels: dict, heading: str, path: Path) -> str:
    plt = pyplot()
    runs = list(dict.fromkeys(run for lines in panels.values() for run, _, _ in lines))
    colors = {run: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    n_handles = len(runs) + len({s for lines in panels.values() for _, s, _ in lines})
    ncol = min(n_handles, 8)
    legend = 0.25 * math.ceil(n_handles / ncol) + 0.15  # inches under the panels for the legend
    height = 3.3 * rows + 0.3 + legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for run, split, points in lines:
            xs, ys = zip(*points)
            few = len(points) <= 30  # sparse val points get markers
            ax.plot(xs, ys, STYLES[split], color=colors[run], marker="o" if few else None, markersize=3,
                    linewidth=1.4 if split == "train" else 1.8, alpha=0.75 if split == "train" and not few else 1.0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    splits = sorted({s for lines in panels.values() for _, s, _ in lines}, key=SPLITS.index)
    handles = [Line2D([], [], color=colors[r], linewidth=2, label=r) for r in runs]
    handles += [Line2D([], [], color="0.3", linestyle=STYLES[s], label=s) for s in splits]
    fig.suptitle(heading, fontsize=12)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend / height, 1, 1 - 0.25 / height))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def plot_evals(evals: dict, path: Path) -> str:
    """Bars with 95% intervals: win rate (Wilson), mean judge score per side, KL (mean -/+ 1.96 se)."""
    plt = pyplot()
    names = list(evals)
    panels = []
    won = [(n, e["win_rate"]) for n, e in evals.items() if e.get("win_rate")]
    if won:
        panels.append("win")
    if any((e.get("policy") or {}).get("score") for e in evals.values()):
        panels.append("score")
    if any(e.get("kl") for e in evals.values()):
        panels.append("kl")
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2, 0.9 * len(names) + 2) * len(panels), 3.9), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "win":
            labels = [f"{n}\n{w['wins']}/{w['ties']}/{w['losses']}" for n, w in won]
            bars(ax, labels, [(w["win_rate"], w["low"], w["high"]) for _, w in won], "tab:blue")
            ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
            ax.set_title("win rate vs baseline (95% Wilson)\nwins/ties/losses under each bar", fontsize=10)
        elif panel == "score":
            x = list(range(len(names)))
            for offset, side, color in ((-0.2, "policy", "tab:green"), (0.2, "baseline", "tab:gray")):
                values = [interval((evals[n].get(side) or {}).get("score")) for n in names]
                bars(ax, names, values, color, [i + offset for i in x], 0.38, side)
            top = max([v[2] for n in names for side in ("policy", "baseline")
                       if (v := interval((evals[n].get(side) or {}).get("score")))] + [0])
            ax.set_ylim(top=top + 0.25 * (top - min(ax.get_ylim()[0], 0)))  # headroom for the legend
            ax.legend(fontsize=8, frameon=False, ncol=2, loc="upper center")
            ax.set_title("mean judge score (95% interval)", fontsize=10)
        else:
            values = [interval(evals[n].get("kl"), "kl") for n in names]
            bars(ax, names, values, "tab:orange")
            ax.set_title("KL(policy || reference), nats/response\n(mean, 95% interval)", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def interval(d: dict | None, key: str = "mean") -> tuple | None:
    if not d or d.get(key) is None:
        return None
    low, high = d.get("low"), d.get("high")
    return d[key], d[key] if low is None else low, d[key] if high is None else high


def bars(ax, labels, values, color, x=None, width=0.6, label=None) -> None:
    """values: (mean, low, high) or None per bar; drawn with asymmetric error bars."""
    x = list(range(len(labels))) if x is None else x
    keep = [(i, v) for i, v in zip(x, values) if v is not None]
    if keep:
        xs, vs = zip(*keep)
        ax.bar(xs, [v[0] for v in vs], width, color=color, label=label,
               yerr=[[max(v[0] - v[1], 0) for v in vs], [max(v[2] - v[0], 0) for v in vs]], capsize=4, ecolor="0.2")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)


def eval_table(evals: dict) -> str:
    def num(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def ci(d, key="mean"):
        return f"{num(d[key])} [{num(d.get('low'))}, {num(d.get('high'))}]" if d and d.get(key) is not None else "n/a"

    lines = ["| eval | win rate [95% CI] | wins / ties / losses | policy score | baseline score | KL (nats) ± se |",
             "|---|---|---|---|---|---|"]
    for name, e in evals.items():
        w, kl = e.get("win_rate"), e.get("kl")
        wtl = f"{w['wins']} / {w['ties']} / {w['losses']}" if w else "n/a"
        klt = f"{num(kl['kl'])} ± {num(kl.get('stderr'))}" if kl and kl.get("kl") is not None else "n/a"
        lines.append(f"| {name} | {ci(w, 'win_rate')} | {wtl} | {ci((e.get('policy') or {}).get('score'))} | "
                     f"{ci((e.get('baseline') or {}).get('score'))} | {klt} |")
    return "\n".join(lines) + "\n"


def markdown(title: str, roots: list[Path], runs: list[str], sections: list) -> str:
    text = f"# {title}\n\nFrom {', '.join(f'`{r}`' for r in roots)}; runs: {', '.join(runs) or 'none'}.\n"
    for heading, png, body in sections:
        text += f"\n## {heading}\n\n" + (f"![{heading}]({png})\n" if png else "") + (f"\n{body}" if body else "")
    return text


def page(title: str, roots: list[Path], runs: list[str], sections: list) -> str:
    """report.html: the same content, inline CSS only, images by relative path."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>From {esc(', '.join(map(str, roots)))}; runs: {esc(', '.join(runs) or 'none')}.</p>"]
    for heading, png, text in sections:
        body.append(f"<h2>{esc(heading)}</h2>")
        if png:
            body.append(f'<img src="{esc(png)}" alt="{esc(heading)}">')
        if text:
            body.append(table_html(text))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def table_html(text: str) -> str:
    """A markdown pipe table -> an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.strip().splitlines()]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]
    head, rest = rows[0], rows[1:]
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
    return f"<table><tr>{cells}</tr>{trs}</table>"


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
