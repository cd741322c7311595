"""No acknowledged label is lost: `rlhf label serve` as a real process, labels posted over HTTP, the server killed
with SIGKILL while labels are still arriving, restarted on the same database: every label that got a 200 is there."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from labelapp.store import Store
from tests.conftest import ROOT
from tests.test_label_store import write_queue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db, queue, token) -> tuple[subprocess.Popen, str]:
    """`rlhf label serve` in a subprocess -> (process, base URL), once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "label", "serve", "--queue", str(queue),
                             "--db", str(db), "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer within 60 s")


def label_items(client: httpx.Client, name: str, acked: list, stop: threading.Event) -> None:
    """Take the next item and label it, until none is left, `stop` is set or the server is gone; each 200 goes to
    `acked` as (annotator, label_id, body)."""
    try:
        while not stop.is_set():
            item = client.get("/api/next").json()["item"]
            if item is None:
                return
            body = {"item_id": item["id"], "client_id": str(uuid.uuid4()), "chosen": len(acked) % 2,
                    "strength": "better", "unsafe": [False, False]}
            response = client.post("/api/labels", json=body)
            if response.status_code != 200:
                raise RuntimeError(response.text)  # seen as missing acks by the caller
            acked.append((name, response.json()["label_id"], body))
    except httpx.TransportError:  # killed mid-request: that label was not acknowledged
        return


def kill_while_labelling(db, queue, tokens: dict, acked: list, until: int) -> None:
    """Serve, let every annotator label in a thread until `acked` holds `until` labels, then SIGKILL the server."""
    proc, url = serve(db, queue, next(iter(tokens.values())))
    stop, threads, clients = threading.Event(), [], {}
    try:
        clients = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
                   for name, token in tokens.items()}
        threads = [threading.Thread(target=label_items, args=(c, name, acked, stop)) for name, c in clients.items()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acked) < until and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # requests are in flight
        proc.wait(10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for client in clients.values():
            client.close()
        proc.kill()
        proc.wait(10)
    assert len(acked) >= until


@pytest.mark.slow
def test_every_acknowledged_label_survives_kill_9(tmp_path):
    queue, db = tmp_path / "q.jsonl", tmp_path / "l.sqlite"
    write_queue(queue, [(f"P{i}", [f"a{i}", f"b{i}"]) for i in range(400)])
    store = Store(db)
    tokens = {name: store.add_annotator(name) for name in ("ana", "bo")}
    acked = []
    for _ in range(3):  # three kills, each while both annotators are posting
        kill_while_labelling(db, queue, tokens, acked, len(acked) + 40)

    proc, url = serve(db, queue, tokens["ana"])
    try:
        for name, token in tokens.items():
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
                stored = {label["label_id"]: label for label in client.get("/api/labels").json()["labels"]}
                mine = [a for a in acked if a[0] == name]
                for _, label_id, body in mine:
                    assert stored[label_id] == {"label_id": label_id, **{k: body[k] for k in body if k != "client_id"}}
                # the page retries an unanswered POST with the same client_id: after the restart it is a duplicate
                _, label_id, body = mine[-1]
                retry = client.post("/api/labels", json=body).json()
                assert retry["label_id"] == label_id and retry["duplicate"] is True
    finally:
        proc.kill()
        proc.wait(10)
    assert store.count_labels() >= len(acked)
