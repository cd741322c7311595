"""Exports of the labelling database, and inter-annotator agreement.

Formats (one row per (item, annotator): that annotator's latest label; queue order, then annotator name):
    pairs      pair items: {prompt, chosen, rejected, margin (Llama 2, of the strength), strength, unsafe,
               annotator, id}
    rankings   all items: {prompt, responses, ranks (0 = best), annotator, id}
    ratings    ranking items: {prompt, responses, ratings (1-7, higher = better), annotator, id}
    labels     the pipeline's labels file (docs/labelling-queue.md): {id, ranks, annotator}
    kto        one row per judged response: {prompt, completion, label, annotator, id, response (its index)},
               label true = desirable (see `kto_rows`)
pairs, rankings and ratings are read by the reward and DPO stages (datamodules.preference_formats), kto by DPO's
loss_type kto (datamodules.unpaired); labels by `python -m datamodules.labelling --labeller human`. A row those
readers would reject (e.g. ratings that all tie, identical responses) is left out and counted by reason, so an
exported file always loads.

Agreement, over the items labelled by 2+ annotators: each response pair (i, j) of such an item is a unit whose
values are the annotators' preferences ("i" better, "j" better, or a tie). Per-pair agreement is the share of
annotator pairs, over all units, that give the same value; Krippendorff's alpha (nominal) is
1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c * n_k, with o_ck the coincidences of values c and k (each
unit's ordered value pairs weighted 1 / (m_u - 1), m_u its annotators), n_c = sum_k o_ck and n = sum_c n_c
(Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011). alpha is None when every value is the same.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

from core.sources import DataError
from labelapp.store import Store, label_ranks

FORMATS = ("pairs", "rankings", "ratings", "labels", "kto")
DESIRABLE_RATING, UNDESIRABLE_RATING = 5, 3  # on the 1-7 scale: 5-7 desirable, 1-3 undesirable, 4 (neutral) left out


def kto_rows(item: dict, label: dict) -> tuple[list[dict], Counter]:
    """One (item, latest label) -> KTO rows (one per judged response) and the responses left out, by reason.

    Ranking items carry single-response judgements: a response is desirable with a rating of 5-7 and no flag,
    undesirable with a rating of 1-3 or any flag (fails_instruction, harmful, ...); a 4 without flags is left out.
    Pair items carry only a choice: the chosen response is desirable and the rejected one undesirable (TRL's
    unpairing of preference pairs), a response marked unsafe is undesirable whichever was chosen, and a choice
    of strength "unsure" is left out (neither response is judged).
    """
    payload, rows, left_out = label["payload"], [], Counter()
    if item["kind"] == "pair":
        if payload["strength"] == "unsure":
            return [], Counter({"unsure pair choice": 2})
        labels = [i == payload["chosen"] and not payload["unsafe"][i] for i in range(2)]
    else:
        labels = []
        for rating, flags in zip(payload["ratings"], payload["flags"]):
            if flags or rating <= UNDESIRABLE_RATING:
                labels.append(False)
            elif rating >= DESIRABLE_RATING:
                labels.append(True)
            else:
                labels.append(None)
                left_out["neutral rating (4) without flags"] += 1
    for i, desirable in enumerate(labels):
        if desirable is not None:
            rows.append({"prompt": item["prompt"], "completion": item["responses"][i], "label": desirable,
                         "annotator": label["annotator"], "id": item["id"], "response": i})
    return rows, left_out


def row_of(fmt: str, item: dict, label: dict) -> dict | None:
    """One (item, latest label) -> the export row of `fmt`, or None when the format leaves this kind of item out."""
    payload, base = label["payload"], {"annotator": label["annotator"], "id": item["id"]}
    ranks = label_ranks(item["kind"], payload)
    if fmt == "pairs":
        if item["kind"] != "pair":
            return None
        chosen = payload["chosen"]
        return {"prompt": item["prompt"], "chosen": item["responses"][chosen],
                "rejected": item["responses"][1 - chosen],
                "strength": payload["strength"],  # the reader maps it (its --data.strength_map, or Llama 2's)
                "unsafe": any(payload["unsafe"]), **base}
    if fmt == "rankings":
        return {"prompt": item["prompt"], "responses": item["responses"], "ranks": ranks, **base}
    if fmt == "ratings":
        if item["kind"] != "ranking":
            return None
        return {"prompt": item["prompt"], "responses": item["responses"], "ratings": payload["ratings"], **base}
    if fmt == "labels":
        return {"id": item["id"], "ranks": ranks, "annotator": label["annotator"]}
    raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")


def check_row(fmt: str, row: dict, item: dict, where: str) -> None:
    """The reader of `fmt` accepts `row`, else DataError (the row is left out of the export)."""
    if fmt == "labels":
        from datamodules.labelling import label_ranks as read_label

        read_label(row, item, where)
    elif fmt == "kto":
        from datamodules.unpaired import parse_judgement

        parse_judgement(row, where)
    else:
        from datamodules.preference_formats import parse_preference

        parse_preference(row, where)


def export_rows(store: Store, fmt: str) -> tuple[list[dict], Counter]:
    """(rows of `fmt`, left-out rows counted by reason)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    items, rows, left_out = store.items(), [], Counter()
    for label in store.latest_labels():
        item = items[label["item_id"]]
        if fmt == "labels" and not item["queued"]:  # the labelling command reads it against the current queue
            left_out["item not in the queue last served"] += 1
            continue
        if fmt == "kto":
            candidates, skipped = kto_rows(item, label)
            left_out.update(skipped)
        else:
            candidates = [row_of(fmt, item, label)]
        for row in candidates:
            if row is None:
                continue
            try:
                check_row(fmt, row, item, f"item {item['id']} by {label['annotator']}")
            except DataError as err:
                left_out[err.reason] += 1
                continue
            rows.append(row)
    return rows, left_out


def preference_units(store: Store) -> tuple[list[list[str]], int]:
    """(one unit per response pair (i, j) of each item labelled by 2+ annotators: the annotators' values "i",
    "j" or "tie"; the number of such items)."""
    items, by_item = store.items(), {}
    for label in store.latest_labels():
        by_item.setdefault(label["item_id"], []).append(label)
    units, multi = [], 0
    for item_id, labels in by_item.items():
        if len(labels) < 2:
            continue
        multi += 1
        all_ranks = [label_ranks(items[item_id]["kind"], label["payload"]) for label in labels]
        for i, j in combinations(range(len(items[item_id]["responses"])), 2):
            units.append([("i" if r[i] < r[j] else "j" if r[i] > r[j] else "tie") for r in all_ranks])
    return units, multi


def pairwise_agreement(units: list[list[str]]) -> tuple[int, int]:
    """(annotator pairs giving the same value, annotator pairs) over all units."""
    same = total = 0
    for values in units:
        for a, b in combinations(values, 2):
            same += a == b
            total += 1
    return same, total


def krippendorff_alpha_nominal(units: list[list[str]]) -> float | None:
    """Krippendorff's alpha for nominal values; units with fewer than 2 values are not pairable (left out)."""
    coincidences: Counter = Counter()  # (c, k) -> o_ck
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in ((values[x], values[y]) for x in range(m) for y in range(m) if x != y):
            coincidences[a, b] += 1 / (m - 1)
    totals: Counter = Counter()  # n_c
    for (c, _), o in coincidences.items():
        totals[c] += o
    n = sum(totals.values())
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if expected == 0:
        return None
    observed = sum(o for (c, k), o in coincidences.items() if c != k)
    return 1 - (n - 1) * observed / expected


def agreement(store: Store) -> dict:
    """{items (labelled by 2+ annotators), units (their response pairs), annotator_pairs, pairwise_agreement,
    krippendorff_alpha}; the two statistics are None without such items."""
    units, items = preference_units(store)
    same, total = pairwise_agreement(units)
    return {"items": items, "units": len(units), "annotator_pairs": total,
            "pairwise_agreement": same / total if total else None,
            "krippendorff_alpha": krippendorff_alpha_nominal(units)}


def write_export(store: Store, fmt: str, out: str | Path) -> dict:
    """Write `fmt` rows to `out` (.jsonl, atomically) and, when some item has 2+ annotators, the agreement to
    OUT with suffix .agreement.json -> {rows, left_out, out, agreement, agreement_file}."""
    from core.outputs import write_jsonl  # stdlib only: no torch

    out = Path(out)
    rows, left_out = export_rows(store, fmt)
    write_jsonl(out, rows)
    stats, agreement_file = agreement(store), None
    if stats["items"]:
        agreement_file = out.with_suffix(".agreement.json")
        agreement_file.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return {"rows": len(rows), "left_out": dict(left_out), "out": str(out), "agreement": stats,
            "agreement_file": None if agreement_file is None else str(agreement_file)}
