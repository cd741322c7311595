"""Load test of `rlhf label serve`: concurrent annotators, each submission sent twice (a double click), then counts.

    .venv/bin/python benchmarks/label_load.py [--annotators 20] [--labels 2000] [--overlap 2]

Starts the real server (uvicorn, one process) on a fresh database and a queue of labels / overlap items (every 4th a
ranking of 4 responses, the rest pairs). Each annotator is a thread with its own HTTP connection: GET /api/next, POST
the label, POST it again with the same client_id, until no item is left. Then, from the database itself: no label
lost (one row per acknowledged label_id, every item labelled by `overlap` annotators), none duplicated (rows =
acknowledged labels; every retry answered duplicate: true with the first label_id). Prints one JSON line: p50/p95
latency per request kind, throughput, the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datamodules.labelling import item_id  # noqa: E402
from labelapp.store import Store  # noqa: E402


def serve(db: Path, queue: Path, token: str, overlap: int) -> tuple[subprocess.Popen, str]:
    """`rlhf label serve` in a subprocess on a free port -> (process, base URL), once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "label", "serve", "--queue", str(queue), "--db",
                             str(db), "--port", str(port), "--overlap", str(overlap)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer within 60 s")


def write_queue(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        prompt, responses = f"Prompt {i}: say something <b>useful</b>", [f"response {i}.{j}" for j in
                                                                           range(4 if i % 4 == 3 else 2)]
        rows.append({"id": item_id(prompt, responses), "prompt": prompt, "responses": responses,
                     "kind": "ranking" if len(responses) > 2 else "pair", "meta": {"i": i}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def body_for(item: dict, n: int) -> dict:
    body = {"item_id": item["id"], "client_id": str(uuid.uuid4())}
    if item["kind"] == "pair":
        return {**body, "chosen": n % 2, "strength": "better", "unsafe": [False, n % 7 == 0]}
    k = len(item["responses"])
    return {**body, "ranks": [(j + n) % k for j in range(k)], "ratings": [1 + (j + n) % 7 for j in range(k)],
            "flags": [["harmful"] if j == 0 and n % 5 == 0 else [] for j in range(k)]}


def annotator(url: str, name: str, token: str, out: dict, errors: list) -> None:
    """Label until no item is left; out[name] = [(label_id, item_id)], latencies in out['latency'][kind]."""
    mine, latency = out.setdefault(name, []), out["latency"]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        try:
            while True:
                t = time.perf_counter()
                item = client.get("/api/next").json()["item"]
                latency["next"].append(time.perf_counter() - t)
                if item is None:
                    return
                body = body_for(item, len(mine))
                answers = []
                for kind in ("post", "retry"):
                    t = time.perf_counter()
                    response = client.post("/api/labels", json=body)
                    latency[kind].append(time.perf_counter() - t)
                    if response.status_code != 200:
                        raise RuntimeError(f"{name}: {kind} -> {response.status_code} {response.text}")
                    answers.append(response.json())
                first, retry = answers
                if first["duplicate"] or not retry["duplicate"] or retry["label_id"] != first["label_id"]:
                    raise RuntimeError(f"{name}: double click answered {first} then {retry}")
                mine.append((first["label_id"], item["id"]))
        except Exception as err:  # reported, and fails the run
            errors.append(repr(err))


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p95_ms": round(q[94], 2), "max_ms": round(ms[-1], 2)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            **{p: version(p) for p in ("fastapi", "starlette", "uvicorn", "httpx")},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--labels", type=int, default=2000)
    parser.add_argument("--overlap", type=int, default=2)
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        queue, db = Path(tmp) / "queue.jsonl", Path(tmp) / "labels.sqlite"
        items = args.labels // args.overlap
        write_queue(queue, items)
        store = Store(db)
        tokens = {f"ann{i:02d}": store.add_annotator(f"ann{i:02d}") for i in range(args.annotators)}
        proc, url = serve(db, queue, next(iter(tokens.values())), overlap=args.overlap)
        out, errors = {"latency": defaultdict(list)}, []
        try:
            threads = [threading.Thread(target=annotator, args=(url, n, t, out, errors)) for n, t in tokens.items()]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait(10)
        con = sqlite3.connect(db)
        rows = con.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        pairs = con.execute("SELECT COUNT(*) FROM (SELECT DISTINCT annotator_id, item_id FROM labels)").fetchone()[0]
        per_item = Counter(
            n for (n,) in con.execute("SELECT COUNT(DISTINCT annotator_id) FROM labels GROUP BY item_id")
        )
        stored_ids = {i for (i,) in con.execute("SELECT id FROM labels")}
    acked = [label for name, labels in out.items() if name != "latency" for label in labels]
    per_annotator = sorted(len(labels) for name, labels in out.items() if name != "latency")
    checks = {"errors": errors, "acknowledged": len(acked), "rows": rows, "distinct_annotator_item": pairs,
              "lost": len({label_id for label_id, _ in acked} - stored_ids),
              "duplicated": rows - len(acked), "items_by_annotator_count": dict(per_item),
              "labels_per_annotator_min_max": [per_annotator[0], per_annotator[-1]]}
    ok = (not errors and len(acked) == rows == pairs == items * args.overlap and checks["lost"] == 0
          and per_item == Counter({args.overlap: items}))
    latency = {kind: percentiles(values) for kind, values in out["latency"].items()}
    latency["all"] = percentiles([v for values in out["latency"].values() for v in values])
    print(json.dumps({"ok": ok, "annotators": args.annotators, "items": items, "overlap": args.overlap, **checks,
                      "wall_s": round(wall, 2), "labels_per_s": round(len(acked) / wall, 1), "latency": latency,
                      "machine": info}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
