"""The labelling app's HTTP API (docs/labelling-app.md) through Starlette's TestClient: auth, assignment, labels."""

import json

import pytest
from fastapi.testclient import TestClient

from labelapp.server import STATIC, create_app
from labelapp.store import Store
from tests.test_label_store import write_queue

XSS = '<script>alert("x")</script> & <b>bold</b>'


def make_app(tmp_path, overlap=1, groups=None):
    groups = groups or [(f"P0 {XSS}", ["a", XSS]), ("P1", ["c", "d", "e"]), ("P2", ["f", "g"])]
    write_queue(tmp_path / "q.jsonl", groups)
    db = tmp_path / "l.sqlite"
    store = Store(db)
    tokens = {name: store.add_annotator(name, admin=name == "admin") for name in ("a", "b", "admin")}
    client = TestClient(create_app(db, tmp_path / "q.jsonl", overlap=overlap))
    for name, token in tokens.items():
        client.__dict__[name] = {"Authorization": f"Bearer {token}"}  # client.a: a's headers
    return client, store


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


def pair_label(item_id, client_id="c1", **change):
    return {"item_id": item_id, "client_id": client_id, "chosen": 0, "strength": "slightly better",
            "unsafe": [False, False], **change}


@pytest.mark.parametrize("route", ["/api/me", "/api/next", "/api/labels", "/api/items/x", "/api/export"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_401_without_or_with_a_wrong_token(app, route, headers):
    client, store = app
    response = client.get(route, headers=headers)
    assert response.status_code == 401 and "token" in response.json()["error"]
    response = client.post("/api/labels", headers=headers, json=pair_label("x"))
    assert response.status_code == 401 and store.count_labels() == 0


def test_me_next_and_progress(app):
    client, _ = app
    assert client.get("/api/me", headers=client.a).json() == {"annotator": "a", "admin": False, "labelled": 0,
                                                               "total": 3}
    body = client.get("/api/next", headers=client.a).json()
    assert body["progress"] == {"labelled": 0, "total": 3}
    assert set(body["item"]) == {"id", "kind", "prompt", "responses", "meta"} and body["item"]["kind"] == "pair"


def test_script_in_a_response_comes_back_as_json_text_unchanged(app):
    client, _ = app
    response = client.get("/api/next", headers=client.a)
    assert response.headers["content-type"].startswith("application/json")
    item = response.json()["item"]
    assert item["responses"][1] == XSS and item["prompt"] == f"P0 {XSS}"  # the page must escape, not the API
    assert response.headers["x-content-type-options"] == "nosniff"


def test_403_on_another_annotators_item(app):
    client, store = app
    item = client.get("/api/next", headers=client.a).json()["item"]
    assert client.get("/api/next", headers=client.b).json()["item"]["id"] != item["id"]  # overlap 1
    response = client.get(f"/api/items/{item['id']}", headers=client.b)
    assert response.status_code == 403 and "not assigned to b" in response.json()["error"]
    assert client.post("/api/labels", headers=client.b, json=pair_label(item["id"])).status_code == 403
    assert client.get("/api/items/nosuchitem", headers=client.a).status_code == 404
    assert client.post("/api/labels", headers=client.a, json=pair_label("nosuchitem")).status_code == 404
    assert store.count_labels() == 0


def test_overlap_2_gives_the_same_item_to_two_annotators(tmp_path):
    client, _ = make_app(tmp_path, overlap=2)
    first = client.get("/api/next", headers=client.a).json()["item"]
    assert client.get("/api/next", headers=client.b).json()["item"] == first
    assert client.get("/api/next", headers=client.admin).json()["item"]["id"] != first["id"]
    for who in (client.a, client.b):
        assert client.post("/api/labels", headers=who, json=pair_label(first["id"])).status_code == 200


def test_a_label_round_trip_and_a_double_click_stores_one(app):
    client, store = app
    item = client.get("/api/next", headers=client.a).json()["item"]
    first = client.post("/api/labels", headers=client.a, json=pair_label(item["id"]))
    again = client.post("/api/labels", headers=client.a, json=pair_label(item["id"]))
    assert first.status_code == again.status_code == 200
    assert first.json() == {"label_id": 1, "duplicate": False, "progress": {"labelled": 1, "total": 3}}
    assert again.json() == {**first.json(), "duplicate": True}
    assert store.count_labels() == 1
    got = client.get(f"/api/items/{item['id']}", headers=client.a).json()
    assert got["label"] == {"chosen": 0, "strength": "slightly better", "unsafe": [False, False]}
    changed = client.post("/api/labels", headers=client.a, json=pair_label(item["id"], "c2", chosen=1))
    assert changed.json()["label_id"] == 2 and changed.json()["progress"]["labelled"] == 1
    assert client.get("/api/labels", headers=client.a).json() == {"labels": [
        {"item_id": item["id"], "label_id": 2, "chosen": 1, "strength": "slightly better", "unsafe": [False, False]}]}
    assert client.get("/api/labels", headers=client.b).json() == {"labels": []}  # never another's
    reused = client.post("/api/labels", headers=client.a, json=pair_label(item["id"], "c2", chosen=0))
    assert reused.status_code == 409 and store.count_labels() == 2


def test_a_ranking_label(app):
    client, _ = app
    client.get("/api/next", headers=client.a)
    label = client.post("/api/labels", headers=client.a, json=pair_label(
        client.get("/api/next", headers=client.a).json()["item"]["id"]))
    ranking = client.get("/api/next", headers=client.a).json()["item"]
    assert label.status_code == 200 and ranking["kind"] == "ranking"
    body = {"item_id": ranking["id"], "client_id": "r1", "ranks": [1, 2, 0], "ratings": [5, 2, 7],
            "flags": [[], ["made_up_facts", "harmful"], []]}
    assert client.post("/api/labels", headers=client.a, json=body).status_code == 200
    assert client.get(f"/api/items/{ranking['id']}", headers=client.a).json()["label"] == {
        key: body[key] for key in ("ranks", "ratings", "flags")}


@pytest.mark.parametrize("body", [
    "not json", "[1, 2]", {"client_id": "c"}, {"item_id": 5, "client_id": "c"},
    pair_label("ID", client_id=None), pair_label("ID", chosen=3), pair_label("ID", strength="meh"),
    pair_label("ID", unsafe=[True]), pair_label("ID", ranks=[0, 1]),
    {"item_id": "RID", "client_id": "c", "ranks": [0, 1, 1], "ratings": [1, 2, 3], "flags": [[], [], []]},
    {"item_id": "RID", "client_id": "c", "ranks": [0, 1, 2], "ratings": [0, 2, 3], "flags": [[], [], []]},
    {"item_id": "RID", "client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 2, 3], "flags": [["bad"], [], []]},
    {"item_id": "RID", "client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 2], "flags": [[], [], []]},
    {**pair_label("RID"), "chosen": 0},
])
def test_each_invalid_body_is_422_with_a_reason_and_stores_nothing(app, body):
    client, store = app
    pair = client.get("/api/next", headers=client.a).json()["item"]["id"]
    client.post("/api/labels", headers=client.a, json=pair_label(pair, "first"))
    ranking = client.get("/api/next", headers=client.a).json()["item"]["id"]
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"RID"', json.dumps(ranking)).replace('"ID"', json.dumps(pair)))
        response = client.post("/api/labels", headers=client.a, json=body)
    else:
        response = client.post("/api/labels", headers={**client.a, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 422 and response.json()["error"]
    assert store.count_labels() == 1


def test_export_is_for_admins(app):
    client, _ = app
    assert client.get("/api/export?format=pairs", headers=client.a).status_code == 403
    assert client.get("/api/export?format=csv", headers=client.admin).status_code == 422
    body = client.get("/api/export?format=pairs", headers=client.admin).json()
    assert body["rows"] == [] and body["agreement"]["pairwise_agreement"] is None


def test_the_page_and_unknown_routes(app):
    client, _ = app
    if (STATIC / "index.html").is_file():  # labelapp/static: the page's files, served without a token
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]  # no script but our own file, no inline code, no URLs
        assert "script-src 'self'" in policy and "default-src 'self'" in policy and "unsafe-inline" not in policy
        assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/nothing.js").status_code == 404
    response = client.get("/api/nothing", headers=client.a)
    assert response.status_code == 404 and "error" in response.json()
