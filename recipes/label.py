"""`rlhf label`: the human-feedback web app (docs/labelling-app.md).

    rlhf label add-annotator NAME [--db labels.sqlite] [--admin]        prints the new token, only it
    rlhf label serve --queue QUEUE.jsonl [--db labels.sqlite] [--host 127.0.0.1] [--port 8000] [--overlap 1]
    rlhf label export [--db labels.sqlite] --format pairs|rankings|ratings|labels|kto --out FILE.jsonl

The queue is the one `python -m datamodules.labelling --labeller human` writes (docs/labelling-queue.md); serving
imports its items by id, so serving a rewritten queue keeps every label. `export --format labels --out
ROUND.labels.jsonl` gives that command its labels back; pairs, rankings and ratings train `rlhf reward` and `rlhf dpo`;
kto (one desirable/undesirable row per judged response) trains `rlhf dpo --model.loss_type kto --data.layout unpaired`.
Needs the `label` extra: pip install 'lightning-rlhf[label]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "rlhf label"
DEFAULT_DB = "labels.sqlite"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{add-annotator,serve,export}")
    add = commands.add_parser("add-annotator", help="add an annotator and print their token")
    add.add_argument("name", help="1-64 letters, digits, '.', '_', '-' or '@'")
    add.add_argument("--db", type=Path, default=Path(DEFAULT_DB))
    add.add_argument("--admin", action="store_true", help="may export (GET /api/export)")
    serve = commands.add_parser("serve", help="serve the page and the API")
    serve.add_argument("--queue", type=Path, required=True, help="the queue .jsonl (docs/labelling-queue.md)")
    serve.add_argument("--db", type=Path, default=Path(DEFAULT_DB))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--overlap", type=int, default=1, help="annotators per item (2+ gives agreement statistics)")
    export = commands.add_parser("export", help="write the labels as a preference or labels file")
    export.add_argument("--db", type=Path, default=Path(DEFAULT_DB))
    export.add_argument("--format", required=True, choices=["pairs", "rankings", "ratings", "labels", "kto"])
    export.add_argument("--out", type=Path, required=True, help="a .jsonl file (written whole, atomically)")
    args = parser.parse_args(argv)

    if args.command == "add-annotator":
        from labelapp.store import Store

        try:
            token = Store(args.db).add_annotator(args.name, args.admin)
        except ValueError as err:
            add.error(str(err))  # exit 2
        print(token)
    elif args.command == "serve":
        if args.overlap < 1:
            serve.error(f"--overlap is the number of annotators per item, at least 1, got {args.overlap}")
        run_server(args)
    else:
        if args.out.suffix.lower() != ".jsonl":
            export.error(f"--out {args.out}: a .jsonl file is needed")
        if not args.db.is_file():
            export.error(f"--db {args.db}: no such database")
        from labelapp.export import write_export
        from labelapp.store import Store

        result = write_export(Store(args.db), args.format, args.out)
        left = ", ".join(f"{n} {reason}" for reason, n in result["left_out"].items())
        print(f"{PROG} export: {result['rows']} {args.format} rows -> {args.out}"
              + (f" (left out: {left})" if left else ""), file=sys.stderr)
        if result["agreement_file"]:
            print(f"agreement -> {result['agreement_file']}", file=sys.stderr)
            print(json.dumps(result["agreement"]))
        else:
            print("agreement: no item is labelled by 2 or more annotators", file=sys.stderr)


def run_server(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from labelapp.server import create_app
    except ImportError as err:
        raise SystemExit(f"{PROG} serve: {err.name} is missing: pip install 'lightning-rlhf[label]'") from None
    app = create_app(args.db, args.queue, args.overlap)  # a bad queue row: DataError -> exit 3 (recipes/cli.py)
    names, imported = app.state.store.annotator_names(), app.state.imported
    print(f"{PROG}: {imported['items']} items ({imported['new']} new) from {args.queue}, {len(names)} annotators, "
          f"overlap {args.overlap}, database {args.db}; open http://{args.host}:{args.port}/", file=sys.stderr)
    if not names:
        print(f"{PROG}: no annotators yet: rlhf label add-annotator NAME --db {args.db}", file=sys.stderr)
    if args.host not in LOOPBACK:
        print(f"{PROG}: serving plain HTTP on {args.host}: tokens cross the network unencrypted; put a TLS "
              "proxy in front (docs/labelling-app.md)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
