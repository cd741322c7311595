"""The rounds of an `rlhf pipeline` side by side: OUT/rounds.md (a table: one row per round, a column per stage
and metric, and the round's wall time) and OUT/rounds.png (one panel per metric, its value against the round).

The numbers are the manifest's: a stage's last val/ metrics, `rows` of a generate or label file (a label
stage's file is the whole preference data so far), and an eval stage's win rate, mean judge score and KL.
"""

from __future__ import annotations

import math
from pathlib import Path

from recipes.report import pyplot, write_text


def round_table(manifest: dict) -> tuple[list[str], dict[int, dict[str, float]]]:
    """(columns `<stage>/<metric>` in first-seen order, {round: {column: value}}) of the finished round stages
    (an ensemble's metric: its members' mean); each round also gets `wall_s`, the sum of its stages' wall times."""
    columns, table = [], {}
    for entry in manifest.get("stages", []):
        k = entry.get("round")
        if k is None or entry.get("status") != "done":
            continue
        row = table.setdefault(k, {"wall_s": 0.0})
        row["wall_s"] += entry.get("wall_s") or 0.0
        template = entry["name"].split(".", 1)[1]
        metrics = entry.get("metrics") or {}
        members = [m for m in metrics.values() if isinstance(m, dict)]  # an ensemble: per member; their mean
        for metric in dict.fromkeys(k for m in members for k in m):
            values = [m[metric] for m in members if metric in m]
            metrics = {**metrics, metric: sum(values) / len(values)}
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                column = f"{template}/{metric}"
                columns += [column] if column not in columns else []
                row[column] = value
    return columns, dict(sorted(table.items()))


def write_rounds(out: Path, manifest: dict) -> Path | None:
    """OUT/rounds.md and OUT/rounds.png, or None while no round stage has finished."""
    columns, table = round_table(manifest)
    if not table:
        return None
    png = out / "rounds.png"
    plt = pyplot()
    n = len(columns)
    cols = min(3, n) or 1
    fig, axes = plt.subplots((n + cols - 1) // cols or 1, cols,
                             figsize=(4.2 * cols, 3.0 * ((n + cols - 1) // cols or 1)), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        points = [(k, row[column]) for k, row in table.items() if column in row]
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o")
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(list(table))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png)
    head = ["round", *columns, "wall_s"]
    lines = ["# rlhf pipeline: rounds", "", f"Pipeline {manifest.get('pipeline')}, run folder {out}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in table.items():
        cells = [str(k)] + [_cell(row.get(c)) for c in columns] + [f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![one panel per metric, against the round]({png.name})", ""]
    path = out / "rounds.md"
    write_text(path, "\n".join(lines))
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) >= 10 else f"{value:.4g}"
