"""`rlhf relabel`: hindsight instruction relabelling (HIR; Zhang et al. 2023, arXiv 2302.05206): each sample of
the policy is paired with the instruction it did fulfil, and the pairs become SFT demonstrations.

    rlhf generate --model runs/sft --prompts prompts.jsonl --out samples.jsonl --num_samples 4
    rlhf relabel --samples samples.jsonl --relabel core.tasks:hindsight_prompt --out relabelled.jsonl
    rlhf sft fit --config configs/sft/synthetic.yaml --config configs/sft/synthetic-hir.yaml \\
        --model.policy.path runs/sft --data.train_file relabelled.jsonl

--samples is an `rlhf generate` file (rows {prompt, response, sample, finish_reason, index, meta}). --relabel is
a function `(prompt: str, response: str, score: float | None) -> str | None` as "package.module:name": the prompt
the response is a good answer to (the original one to keep the sample as it is), or None to drop the sample.
`score` is --judge's score of (prompt, response) when --judge is given (a RewardSpec as YAML/JSON text or a file,
or a reward-model folder, as `rlhf eval --judge` reads it), else None. The built-in task's relabeller is
core.tasks:hindsight_prompt (reverse and sort). Samples cut at --max_new_tokens (finish_reason "length") are
dropped unless --keep_unfinished (SFT would teach them as finished answers: EOS follows every completion), and so
are blank responses.

--out gets SFT rows {prompt, completion (the response), meta: {original_prompt, score, relabelled, index,
sample}}, what `rlhf sft fit` reads, written whole (a temp file, then a rename). --mix FILE adds --mix_ratio x
(rows kept) demonstrations drawn at random (--seed) from an SFT file, e.g. the original demonstrations, as HIR
keeps some of its starting data; they come after the relabelled rows with meta {source: FILE:LINE}.
Prints how many samples were relabelled, kept as they are and dropped.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

PROG = "rlhf relabel"


def _flag(text: str) -> bool:
    """true / false as a pipeline writes a flag's value (--keep_unfinished=true), or 1 / 0, yes / no."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The flags alone (rlhf pipeline checks a relabel stage's args with it before anything runs)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="`rlhf generate` jsonl")
    parser.add_argument("--relabel", required=True,
                        help="package.module:name of (prompt, response, score) -> new prompt or None, "
                             "e.g. core.tasks:hindsight_prompt")
    parser.add_argument("--out", type=Path, required=True, help="SFT rows .jsonl (written whole, atomically)")
    parser.add_argument("--judge", default=None,
                        help="scores each sample for the function: RewardSpec as YAML/JSON text or a file, or a "
                             "reward-model folder (default: none, score None)")
    parser.add_argument("--keep_unfinished", type=_flag, nargs="?", const=True, default=False, metavar="BOOL",
                        help="keep samples cut at max_new_tokens (finish_reason length); default: dropped")
    parser.add_argument("--mix", type=Path, default=None, help="an SFT file to draw extra demonstrations from")
    parser.add_argument("--mix_ratio", type=float, default=None,
                        help="demonstrations from --mix per row kept (default 1.0 with --mix)")
    parser.add_argument("--seed", type=int, default=0, help="which --mix rows are drawn")
    parser.add_argument("--device", default="cpu", help="where the --judge's models run")
    return parser


def parse_args(argv: list[str] | None = None):
    """(args, the relabel function, RewardSpec or None): usage errors and a bad --relabel or --judge exit 2 before
    any file is read or model loaded."""
    from core.reward_spec import import_reward_function
    from recipes.eval import read_judge

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".jsonl":
        parser.error(f"--out {args.out}: a .jsonl file is needed (JSON lines of SFT rows)")
    if args.mix_ratio is not None and (args.mix is None or not args.mix_ratio >= 0):
        parser.error("--mix_ratio goes with --mix and is >= 0 (demonstrations per row kept)")
    try:
        fn = import_reward_function(args.relabel, what="relabel function")
    except ValueError as err:
        parser.error(f"--relabel: {err}")
    return args, fn, read_judge(parser, args.judge) if args.judge else None


def read_samples(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of each sample, its prompt and response strings checked; else DataError naming file:line."""
    from datamodules.formats import DataError, iter_rows

    rows = []
    for where, row in iter_rows(str(path)):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                got = "missing" if key not in row else type(row[key]).__name__
                raise DataError(where, f"field '{key}' is not a string",
                                f"got {got}; an `rlhf generate` row has prompt and response text")
        if not row["prompt"].strip():
            raise DataError(where, "empty field 'prompt'")
        rows.append((where, row))
    if not rows:
        raise DataError(str(path), "no samples", "an empty file")
    return rows


def relabel(samples: list[tuple[str, dict]], fn, name: str, scores: list[float] | None,
            keep_unfinished: bool = False) -> tuple[list[dict], dict]:
    """fn(prompt, response, score) per sample -> (SFT rows, counts {samples, relabelled, kept, dropped, by_function,
    unfinished, blank}). What fn returns besides a non-blank string or None, or raises, is a DataError naming the
    sample's file:line."""
    from datamodules.formats import DataError

    rows, counts = [], dict.fromkeys(("relabelled", "kept", "dropped", "by_function", "unfinished", "blank"), 0)
    counts["samples"] = len(samples)
    for i, (where, row) in enumerate(samples):
        prompt, response = row["prompt"], row["response"]
        score = None if scores is None else scores[i]
        if not response.strip():
            counts["blank"] += 1
            continue
        if row.get("finish_reason") == "length" and not keep_unfinished:
            counts["unfinished"] += 1
            continue
        try:
            new = fn(prompt, response, score)
        except Exception as err:
            raise DataError(where, f"the relabel function {name} failed on this sample",
                            f"{type(err).__name__}: {err}") from err
        if new is None:
            counts["by_function"] += 1
            continue
        if not isinstance(new, str) or not new.strip():
            got = "an empty string" if isinstance(new, str) else f"{type(new).__name__} {new!r:.60}"
            raise DataError(where, f"the relabel function {name} returned {got} for this sample",
                            "it returns the new prompt (a non-empty string) or None to drop the sample")
        counts["relabelled" if new != prompt else "kept"] += 1
        rows.append({"prompt": new, "completion": response,
                     "meta": {"original_prompt": prompt, "score": score, "relabelled": new != prompt,
                              "index": row.get("index"), "sample": row.get("sample")}})
    counts["dropped"] = counts["by_function"] + counts["unfinished"] + counts["blank"]
    return rows, counts


def mix_rows(path: Path, n: int, seed: int) -> list[dict]:
    """n demonstrations (all of them when the file has fewer) drawn without replacement from an SFT file, in file
    order, as rows {prompt, completion, meta: {source: file:line}}."""
    from datamodules.formats import read_demonstrations

    demos = read_demonstrations(str(path))
    chosen = sorted(random.Random(f"relabel/mix/{seed}").sample(range(len(demos)), min(n, len(demos))))
    return [{"prompt": demos[i].prompt, "completion": demos[i].completion, "meta": {"source": demos[i].where}}
            for i in chosen]


def main(argv: list[str] | None = None) -> None:
    args, fn, judge = parse_args(argv)
    from core.outputs import write_jsonl

    samples = read_samples(args.samples)
    scores = None
    if judge is not None:
        judge.load(args.device)
        scores = judge.score([r["prompt"] for _, r in samples], [r["response"] for _, r in samples],
                             [r.get("meta") if isinstance(r.get("meta"), dict) else {} for _, r in samples],
                             args.device).tolist()
    rows, counts = relabel(samples, fn, args.relabel, scores, args.keep_unfinished)
    kept = len(rows)
    if args.mix is not None:
        ratio = 1.0 if args.mix_ratio is None else args.mix_ratio
        rows += mix_rows(args.mix, round(ratio * kept), args.seed)
    write_jsonl(args.out, rows)
    mixed = f" + {len(rows) - kept} demonstrations of {args.mix}" if args.mix is not None else ""
    print(f"{PROG}: {counts['samples']} samples: {counts['relabelled']} relabelled, {counts['kept']} kept as is, "
          f"{counts['dropped']} dropped ({counts['by_function']} by the function, {counts['unfinished']} unfinished, "
          f"{counts['blank']} blank) -> {args.out}: {kept} rows{mixed}")
    if not rows:
        print(f"{PROG}: warning: {args.out} has no rows: rlhf sft fit will refuse it", file=sys.stderr)


if __name__ == "__main__":
    main()
