"""`rlhf label` in a real browser: Debian's chromium driven by Playwright against `rlhf label serve` (a subprocess).

One annotator labels a pair (clicks and keys) and ranks four responses (drag and drop, Alt+Arrow keys, the ↑ button)
with ratings and flags; a lost answer is retried with the same client_id and stored once; the server is killed with
SIGKILL while the page submits and again afterwards, and every label is still there, exactly as entered. Also: a
response holding <script> / <img onerror> shows as text and runs nothing, and no token (or a wrong one) gives the
token form. Screenshots of the two views go to tmp_path; with RLHF_LABEL_SCREENSHOTS=1 they replace the README's
docs/label-pair.png and docs/label-ranking.png
(RLHF_LABEL_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_label_browser.py).

Needs chromium (`apt-get install chromium`; .ci/run installs it) and playwright (the dev extra); skipped without.
Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[dev]')"),
]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
VIEWPORT = {"width": 1200, "height": 800}


def item_id(prompt: str, responses: list[str]) -> str:  # docs/labelling-queue.md
    return hashlib.sha256(json.dumps([prompt, responses]).encode("utf-8")).hexdigest()[:16]


def queue_item(prompt: str, responses: list[str]) -> dict:
    return {"id": item_id(prompt, responses), "prompt": prompt, "responses": responses,
            "kind": "pair" if len(responses) == 2 else "ranking", "meta": {"source": "test"}}


PAIR = queue_item(
    "How do I read a text file **line by line** in Python?",
    ["Open it in a `with` block and iterate over the file object:\n\n"
     "```python\nwith open(\"notes.txt\", encoding=\"utf-8\") as f:\n"
     "    for line in f:\n        print(line.rstrip())\n```\n\n"
     "The file is closed for you, even if an error is raised, and only one line is in memory at a time.",
     "Use **readlines()**:\n\n```python\nlines = open(\"notes.txt\").readlines()\n```\n\n"
     "- reads the *whole* file into memory\n- leaves closing the file to the garbage collector"])
RANKING = queue_item(
    "Suggest a name for a bakery that only sells **sourdough**. Give one name and a short reason.",
    ["**The Patient Loaf**: sourdough takes a day or more to rise, and the name tells customers the bread is "
     "worth the wait.",
     "Bread.",
     "**Wild Rise**: sourdough is leavened by *wild* yeast, and \"rise\" hints at both the dough and the early "
     "morning bake.",
     "**Crumb & Crust**, after the famous 1848 sourdough riots of San Francisco."])
XSS = queue_item(
    "Repeat this *exactly*: <script>window.__xss = 'prompt'</script>",
    ["Sure: <script>window.__xss = 1</script> and <img src=x onerror=\"window.__xss = 2\"> & 'quotes'",
     "```html\n<img src=x onerror=\"window.__xss = 3\">\n```\n**<b>bold?</b>** `<i>code</i>`"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes.cli", "label", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


class Server:
    """`rlhf label serve` as a subprocess on a fixed port, so it can be killed and started again."""

    def __init__(self, tmp: Path, items: list[dict]):
        self.queue, self.db, self.log = tmp / "round1.queue.jsonl", tmp / "labels.sqlite", tmp / "serve.log"
        self.queue.write_text("".join(json.dumps(row) + "\n" for row in items), encoding="utf-8")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def add_annotator(self, name: str) -> str:
        done = cli("add-annotator", name, "--db", str(self.db))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self) -> None:
        log = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipes.cli", "label", "serve", "--queue", str(self.queue), "--db", str(self.db),
             "--port", str(self.port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rlhf label serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"rlhf label serve did not open port {self.port} in 60 s:\n{self.log.read_text()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    def get(self, path: str, token: str) -> dict:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def make(items: list[dict]) -> Server:
        server = Server(tmp_path, items)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    expect.set_options(timeout=20_000)  # not 5 s: a restarted server is reached on the page's next retry (<= 4 s)
    errors = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    # the server's Content-Security-Policy allows our own files only: anything it blocks is logged, and is a bug
    pg.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    pg.js_errors = errors
    yield pg
    context.close()


def order(page) -> list[int]:
    """The responses' original indices in the order the annotator has put them, top first."""
    return page.eval_on_selector_all("#ranking-list > li", "els => els.map(e => Number(e.dataset.index))")


def screenshot(page, folder: Path, name: str) -> None:
    """The view as an annotator sees it (top of the page, no toast, no hover, no focus ring) as folder/name, or as
    docs/name (the README's picture) with RLHF_LABEL_SCREENSHOTS=1."""
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    expect(page.locator("#status")).to_be_hidden()
    out = (DOCS if os.environ.get("RLHF_LABEL_SCREENSHOTS") == "1" else folder) / name
    page.screenshot(path=str(out), animations="disabled")
    assert out.stat().st_size > 10_000


def center(box: dict) -> tuple[float, float]:
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def test_label_a_pair_and_a_ranking_survive_kill9(serve, page, tmp_path):
    server = serve([PAIR, RANKING])
    token = server.add_annotator("ana")
    server.start()

    page.goto(f"{server.url}/?token={token}")
    expect(page.locator("#pair-view")).to_be_visible()
    assert "token=" not in page.url  # taken out of the address bar (kept in localStorage)
    expect(page.locator("#progress")).to_contain_text("0 / 2 labelled")
    expect(page.locator("#annotator-name")).to_have_text("ana")
    expect(page.locator("#prompt strong")).to_have_text("line by line")  # markdown in the prompt
    expect(page.locator("#pair-grid pre code").first).to_contain_text('with open("notes.txt", encoding="utf-8") as f:')
    expect(page.locator("#pair-grid li")).to_have_count(2)
    expect(page.locator("#submit")).to_be_disabled()

    # choose with key 2, change to response 1 by clicking, then Llama 2's strength by clicking
    page.keyboard.press("2")
    expect(page.locator(".response-card[data-index='1']")).to_have_class("card response-card chosen")
    expect(page.locator("#submit")).to_be_disabled()  # no strength yet
    page.click(".choose[data-choice='0']")
    expect(page.locator(".response-card[data-index='0']")).to_have_class("card response-card chosen")
    expect(page.locator(".response-card[data-index='1']")).not_to_have_class("card response-card chosen")
    expect(page.locator(".strength")).to_have_count(4)
    page.click(".strength[data-strength='better']")
    expect(page.locator("#strength-question")).to_have_text("How much better is Response 1 than Response 2?")
    expect(page.locator("#submit")).to_be_enabled()
    screenshot(page, tmp_path, "label-pair.png")
    page.check(".unsafe[data-index='1']")

    # the server stores the first POST but its answer is lost: the page retries with the same client_id
    posts, answers = [], []

    def lose_first_answer(route):
        if route.request.method != "POST":
            return route.continue_()
        posts.append(route.request.post_data_json)
        if len(posts) == 1:
            route.fetch()  # reaches the server, which commits the label...
            return route.abort("connectionreset")  # ...but the page never hears back
        return route.continue_()

    page.route("**/api/labels", lose_first_answer)
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/api/labels") else None)
    page.keyboard.press("Enter")
    expect(page.locator("#ranking-view")).to_be_visible()
    page.unroute("**/api/labels")
    assert len(posts) == 2 and posts[0] == posts[1], posts
    pair_body = posts[0]
    assert isinstance(pair_body["client_id"], str) and len(pair_body["client_id"]) >= 16
    assert {k: pair_body[k] for k in ("item_id", "chosen", "strength", "unsafe")} == {
        "item_id": PAIR["id"], "chosen": 0, "strength": "better", "unsafe": [False, True]}
    assert [r.status for r in answers] == [200]
    assert answers[0].json()["duplicate"] is True  # the retry stored nothing new
    expect(page.locator("#progress")).to_contain_text("1 / 2 labelled")

    # ranking: A B C D -> C A D B, by pointer drag, keyboard and the ↑ button
    expect(page.locator("#ranking-list > li")).to_have_count(4)
    assert order(page) == [0, 1, 2, 3]
    expect(page.locator("#submit")).to_be_disabled()
    page.locator("li[data-index='2'] .handle").drag_to(page.locator("li[data-index='0']"),
                                                       target_position={"x": 60, "y": 4})
    assert order(page) == [2, 0, 1, 3]
    handle = page.locator("li[data-index='1'] .handle").bounding_box()  # B to the bottom, step by step
    last = page.locator("li[data-index='3']").bounding_box()
    page.mouse.move(*center(handle))
    page.mouse.down()
    page.mouse.move(center(handle)[0], last["y"] + last["height"] - 4, steps=12)
    page.mouse.up()
    assert order(page) == [2, 0, 3, 1]
    page.focus("li[data-index='3']")  # D up one with Alt+ArrowUp
    page.keyboard.press("Alt+ArrowUp")
    assert order(page) == [2, 3, 0, 1]
    assert page.evaluate("document.activeElement.dataset.index") == "3"  # focus stays on the moved item
    page.click("li[data-index='0'] .move-up")  # and A back above D with its button
    assert order(page) == [2, 0, 3, 1]
    expect(page.locator("li[data-index='2'] .position")).to_have_text("#1")
    expect(page.locator("li[data-index='1'] .move-down")).to_be_disabled()

    ratings = [6, 2, 7, 3]
    for i, rating in enumerate(ratings):
        page.check(f"input[name='rating-{i}'][value='{rating}']")
    page.check("li[data-index='1'] .flag[data-flag='fails_instruction']")
    page.check("li[data-index='3'] .flag[data-flag='made_up_facts']")
    page.check("li[data-index='3'] .flag[data-flag='fails_instruction']")
    page.uncheck("li[data-index='3'] .flag[data-flag='fails_instruction']")
    expect(page.locator("#submit")).to_be_enabled()
    screenshot(page, tmp_path, "label-ranking.png")

    # the server dies (SIGKILL) before the annotator submits: the page keeps retrying, one submission only
    ranking_posts = []
    page.on("request", lambda r: ranking_posts.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/api/labels") else None)
    server.kill9()
    page.click("#submit")
    expect(page.locator("#status")).to_contain_text("Cannot reach the server")
    expect(page.locator("#submit")).to_be_disabled()  # no double submit while sending
    page.keyboard.press("Enter")
    page.wait_for_timeout(1500)  # a couple of retries against the dead port
    server.start()
    expect(page.locator("#done-view")).to_be_visible()
    expect(page.locator("#progress")).to_contain_text("2 / 2 labelled")
    assert len(ranking_posts) >= 2, ranking_posts  # the first try and at least one retry
    assert all(body == ranking_posts[0] for body in ranking_posts), ranking_posts  # the same client_id each time
    assert ranking_posts[0]["client_id"] != pair_body["client_id"]

    # killed again and restarted: every label is there, exactly as entered
    server.kill9()
    server.start()
    labels = {row["item_id"]: row for row in server.get("/api/labels", token)["labels"]}
    assert set(labels) == {PAIR["id"], RANKING["id"]}
    pair = labels[PAIR["id"]]
    assert (pair["chosen"], pair["strength"], pair["unsafe"]) == (0, "better", [False, True])
    ranking = labels[RANKING["id"]]
    assert ranking["ranks"] == [1, 3, 0, 2]  # C A D B: ranks[i] = position of response i, 0 = best
    assert ranking["ratings"] == ratings
    assert ranking["flags"] == [[], ["fails_instruction"], [], ["made_up_facts"]]
    me = server.get("/api/me", token)
    assert (me["annotator"], me["labelled"], me["total"]) == ("ana", 2, 2)
    assert page.js_errors == []

    # what the browser stored trains the reward model: the pair and the ranking of 4, as K-wise rankings
    exported = server.db.with_name("labels.rankings.jsonl")
    assert cli("export", "--db", str(server.db), "--format", "rankings", "--out", str(exported)).returncode == 0
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted(r["ranks"] for r in rows) == [[0, 1], [1, 3, 0, 2]]  # response 1 chosen: ranks [0, 1]
    root = server.db.parent
    fit = subprocess.run([sys.executable, "-m", "recipes.cli", "reward", "fit", "--config", "configs/reward/tiny.yaml",
                          f"--data.train_file={exported}", "--data.layout=rankings", "--data.batch_size=2",
                          "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                          f"--trainer.default_root_dir={root}",
                          f"--trainer.logger.init_args.save_dir={root / 'runs'}", f"--model.save_dir={root / 'rm'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert (root / "rm" / "lightning_rlhf.json").is_file()


def test_token_form_and_unsafe_text(serve, page):
    server = serve([XSS])
    token = server.add_annotator("ana")
    server.start()

    page.goto(server.url + "/")  # no token: the form, nothing else
    expect(page.locator("#token-view")).to_be_visible()
    expect(page.locator("#item-view")).to_be_hidden()
    expect(page.locator("#token-error")).to_be_hidden()

    page.fill("#token-input", "not-a-token")
    page.press("#token-input", "Enter")
    expect(page.locator("#token-error")).to_contain_text("401")
    expect(page.locator("#token-view")).to_be_visible()
    expect(page.locator("#item-view")).to_be_hidden()

    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#pair-view")).to_be_visible()

    # the page shows the markup as text and runs none of it
    prompt, grid = page.inner_text("#prompt"), page.inner_text("#pair-grid")
    assert "Repeat this exactly: <script>window.__xss = 'prompt'</script>" in prompt
    assert "<script>window.__xss = 1</script> and <img src=x onerror=\"window.__xss = 2\"> & 'quotes'" in grid
    assert '<img src=x onerror="window.__xss = 3">' in grid
    assert "<b>bold?</b>" in grid and "<i>code</i>" in grid
    assert page.locator("#item-view script, #item-view img, #item-view b, #item-view i").count() == 0
    expect(page.locator("#pair-grid strong")).to_have_text("<b>bold?</b>")
    expect(page.locator("#pair-grid code").last).to_have_text("<i>code</i>")
    page.wait_for_timeout(300)
    assert page.evaluate("typeof window.__xss") == "undefined"

    render = "s => window.rlhfLabel.renderMarkdown(s)"
    assert page.evaluate(render, "a & b < c > d \"e\" 'f'") == (
        "<p>a &amp; b &lt; c &gt; d &quot;e&quot; &#39;f&#39;</p>")
    assert page.evaluate(render, "x\n\n- one\n- **two**\n\nend `a<b`") == (
        "<p>x</p><ul><li>one</li><li><strong>two</strong></li></ul><p>end <code>a&lt;b</code></p>")
    assert page.evaluate(render, "```\n<script>\n**no**\n```") == "<pre><code>&lt;script&gt;\n**no**</code></pre>"
    assert page.evaluate(render, "line 1\nline *2*") == "<p>line 1<br>line <em>2</em></p>"

    page.reload()  # the token is remembered
    expect(page.locator("#pair-view")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#token-view")).to_be_visible()
    page.reload()
    expect(page.locator("#token-view")).to_be_visible()
    assert page.js_errors == []
