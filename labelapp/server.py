"""The labelling app's HTTP side: the page (labelapp/static) and the JSON API of docs/labelling-app.md.

Every /api/ route needs `Authorization: Bearer <token>` (401 otherwise). Errors are {"error": reason} and store
nothing. A label is committed to SQLite (WAL, synchronous=FULL) before its 200 goes out. Store calls block on
disk, so they run in the thread pool, never on the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from labelapp.export import FORMATS, agreement, export_rows
from labelapp.store import ClientIdReused, InvalidLabel, Store, read_queue, validate_label

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024  # bytes; a label body is well under 1 KiB
HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           # the page is our own files only: even a rendering bug cannot run a response's script or load a URL
           "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                      "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"}


class ApiError(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status, self.error = status, error


def reply(data: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(data, status, headers={"Cache-Control": "no-store", **HEADERS, **(headers or {})})


def public(item: dict) -> dict:
    return {key: item[key] for key in ("id", "kind", "prompt", "responses", "meta")}


def label_view(label: dict) -> dict:
    return {"item_id": label["item_id"], "label_id": label["label_id"], **label["payload"]}


def create_app(db_path: str | Path, queue_path: str | Path | None = None, overlap: int = 1) -> FastAPI:
    """The ASGI app over the database at `db_path`; with `queue_path`, the queue's items are imported first (a bad
    row: DataError naming file:line). Each item goes to `overlap` annotators."""
    if not isinstance(overlap, int) or overlap < 1:
        raise ValueError(f"overlap is the number of annotators per item, at least 1, got {overlap!r}")
    store = Store(db_path)
    imported = None if queue_path is None else store.import_items(read_queue(queue_path))
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN-loaded pages
    app.state.store, app.state.overlap, app.state.imported = store, overlap, imported

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return reply({"error": err.error}, err.status, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return reply({"error": str(err.detail)}, err.status_code, getattr(err, "headers", None))

    async def annotator(request: Request) -> dict:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing token: send the header Authorization: Bearer <token>")
        who = await run_in_threadpool(store.annotator, token.strip())
        if who is None:
            raise ApiError(401, "unknown token: ask for one (rlhf label add-annotator NAME)")
        return who

    async def assigned_item(item_id: str, who: dict) -> dict:
        item = await run_in_threadpool(store.item, item_id)
        if item is None:
            raise ApiError(404, f"unknown item {item_id!r}")
        if not await run_in_threadpool(store.is_assigned, item_id, who["id"]):
            raise ApiError(403, f"item {item_id!r} is not assigned to {who['name']}")
        return item

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise ApiError(404, f"the page is not installed ({page} missing)")
        return FileResponse(page, headers={"Cache-Control": "no-cache", **HEADERS})

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/api/me")
    async def me(request: Request):
        who = await annotator(request)
        progress = await run_in_threadpool(store.progress, who["id"])
        return reply({"annotator": who["name"], "admin": who["admin"], **progress})

    @app.get("/api/next")
    async def next_item(request: Request):
        who = await annotator(request)
        item = await run_in_threadpool(store.next_item, who["id"], overlap)
        progress = await run_in_threadpool(store.progress, who["id"])
        return reply({"item": None if item is None else public(item), "progress": progress})

    @app.get("/api/items/{item_id}")
    async def get_item(item_id: str, request: Request):
        who = await annotator(request)
        item = await assigned_item(item_id, who)
        labels = await run_in_threadpool(store.latest_labels, who["id"], item_id)
        return reply({**public(item), "label": labels[0]["payload"] if labels else None})

    @app.post("/api/labels")
    async def post_label(request: Request):
        who = await annotator(request)
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ApiError(413, f"body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(422, f"body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"body is not a JSON object, got {type(body).__name__}")
        if not isinstance(body.get("item_id"), str):
            raise ApiError(422, f"item_id must be an item's id (a string), got {body.get('item_id')!r}")
        item = await assigned_item(body["item_id"], who)
        try:
            client_id, payload = validate_label(item["kind"], len(item["responses"]), body)
            label_id, duplicate = await run_in_threadpool(store.add_label, who["id"], item["id"], client_id, payload)
        except InvalidLabel as err:
            raise ApiError(422, str(err)) from None
        except ClientIdReused as err:
            raise ApiError(409, str(err)) from None
        progress = await run_in_threadpool(store.progress, who["id"])
        return reply({"label_id": label_id, "duplicate": duplicate, "progress": progress})

    @app.get("/api/labels")
    async def get_labels(request: Request):
        who = await annotator(request)
        labels = await run_in_threadpool(store.latest_labels, who["id"])
        return reply({"labels": [label_view(label) for label in labels]})

    @app.get("/api/export")
    async def get_export(request: Request, format: str = "pairs"):
        who = await annotator(request)
        if not who["admin"]:
            raise ApiError(403, f"{who['name']} is not an admin (rlhf label add-annotator NAME --admin)")
        if format not in FORMATS:
            raise ApiError(422, f"unknown format {format!r}; formats: {', '.join(FORMATS)}")
        rows, left_out = await run_in_threadpool(export_rows, store, format)
        stats = await run_in_threadpool(agreement, store)
        return reply({"rows": rows, "agreement": stats, "left_out": dict(left_out)})

    return app
