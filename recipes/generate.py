"""`rlhf generate`: sample responses from a policy for a file of prompts, one JSON line per response.

--model is a saved Hugging Face folder (a stage's export, merged or a LoRA adapter folder) or a stage's Lightning
checkpoint (`.ckpt`: the policy is rebuilt from the checkpoint's hyperparameters and its trained weights loaded).
Prompts come in any format `rlhf ppo`/`rlhf rs` read (`prompt` as text or as chat messages, which get the chat
template, or HH-RLHF `chosen`); the row's other columns come back under `meta`:

    rlhf generate --model runs/sft/tiny/hf_model --prompts tests/fixtures/synthetic/prompts_val.jsonl \\
        --out samples.jsonl --num_samples 4 --temperature 0.7 --max_new_tokens 16

Each row: {"prompt" (the text the model saw), "response", "sample" (0..K-1), "finish_reason" ("eos" | "stop" |
"length"), "tokens" (response tokens, EOS included), "index" (the prompt's row in --prompts), "meta"}.

--part I --parts N samples only part I (1-based) of the prompts cut into N contiguous parts of near-equal size
(the first len % N parts get one more prompt), e.g. a fresh slice per round of iterated RLHF; `index` stays the
row in the whole --prompts file, so the parts' outputs never collide.

Rows are appended batch by batch; running again with the same --out (and part) continues after the last prompt that
has all its samples. Batch i (of the part) samples from a generator seeded by (--seed, i), so with the same settings
(batch size included) a resumed run writes exactly the rows an uninterrupted one would. OUT.settings.json records
the model's files, seed, sampling, batch size and prompt length the file was started with: a run with other values
is refused (exit 5, naming them) instead of mixing two runs' samples in one file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

PROG = "rlhf generate"


def build_parser() -> argparse.ArgumentParser:
    """The flags alone (rlhf pipeline checks a generate stage's args with it before anything runs)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder (merged or LoRA adapter) or a stage's .ckpt")
    parser.add_argument("--prompts", required=True,
                        help="prompt file (jsonl/json/csv/parquet), saved dataset or hub id")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl (an existing one is continued)")
    parser.add_argument("--split", default="train", help="split of a saved or hub dataset")
    parser.add_argument("--num_samples", type=int, default=1, help="responses per prompt (K)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); kept in the response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--max_prompt_length", type=int, default=None,
                        help="cut longer prompts from the left to this many tokens (default: no cut)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                        help="weight dtype (default: a checkpoint's own, float32 for a folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--part", type=int, default=None, help="sample only this part (1..--parts) of the prompts")
    parser.add_argument("--parts", type=int, default=None, help="cut the prompts into this many contiguous parts")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num_samples, --batch_size and --max_new_tokens must be at least 1")
    if (args.part is None) != (args.parts is None):
        parser.error("--part and --parts go together: give both (e.g. --part 2 --parts 5) or neither")
    if args.parts is not None and args.parts < 1:
        parser.error(f"--parts must be at least 1, got {args.parts}")
    if args.parts is not None and not 1 <= args.part <= args.parts:
        parser.error(f"--part must be in 1..{args.parts} (--parts), got {args.part}")

    from recipes.common import quiet

    quiet()
    import torch

    from core.generation import SamplingSpec
    from datamodules.formats import read_prompts

    try:  # bad sampling settings stop here, before anything loads
        spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, num_samples=args.num_samples, stop_strings=list(args.stop))
    except ValueError as err:
        parser.error(str(err))
    check_model_arg(args.model)
    records = read_prompts(args.prompts, args.split)  # a bad prompt file stops here, before any weights load
    start, stop = 0, len(records)
    if args.parts is not None:
        start, stop = part_bounds(len(records), args.part, args.parts)
        if start == stop:
            parser.error(f"--part {args.part} --parts {args.parts}: that part of {args.prompts} has no prompts "
                         f"({len(records)} prompts in all); use at most {len(records)} parts")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_policy(args.model, args.dtype, device)
    rows = encode_prompts(records[start:stop], tokenizer, args.max_prompt_length)
    for row in rows:
        row["index"] += start  # the row in the whole --prompts file, so parts never collide
    run(model, tokenizer, rows, spec, args.out, args.seed, args.batch_size, device, run_settings(args, spec))


def run_settings(args, spec) -> dict:
    """What the rows of --out depend on besides the prompts (which finished_prompts matches row by row): a file
    continued with other values would mix two runs' samples. The device is left out."""
    import dataclasses

    from core.outputs import files_stamp

    return {"model": [args.model, files_stamp(args.model)], "dtype": args.dtype, "seed": args.seed,
            "sampling": dataclasses.asdict(spec), "batch_size": args.batch_size,
            "max_prompt_length": args.max_prompt_length}


def check_settings(out: Path, settings: dict | None, rows_written: bool) -> None:
    """OUT.settings.json holds the settings of the run that wrote --out: written when the file starts, compared
    when a run continues it (OutputExistsError naming what differs). A file without one (written before it
    existed) continues as before."""
    from core.outputs import OutputExistsError, settings_differ

    if settings is None:
        return
    path = out.with_name(out.name + ".settings.json")
    settings = json.loads(json.dumps(settings, default=str))
    if rows_written and path.is_file():
        saved = json.loads(path.read_text())
        differ = settings_differ(saved, settings)
        if differ:
            raise OutputExistsError(f"{out} holds samples of a run with other {', '.join(differ)} ({path}); nothing "
                                    "was changed: run with those settings to continue it, or choose another --out")
    elif not rows_written:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(tmp, path)


def part_bounds(total: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part `part` (1-based) of `total` prompts cut into `parts` contiguous parts whose sizes
    differ by at most one, the first total % parts one larger: 10 prompts, 3 parts -> [0, 4), [4, 7), [7, 10)."""
    size, extra = divmod(total, parts)
    start = (part - 1) * size + min(part - 1, extra)
    return start, start + size + int(part <= extra)


def check_model_arg(path: str) -> None:
    """A missing local --model (folder or .ckpt) is a one-line ModelPathError, before anything loads."""
    from core.models import ModelPathError, ModelSpec, check_model_path

    if path.endswith(".ckpt"):
        if not Path(path).expanduser().is_file():
            raise ModelPathError(f"{path}: no such checkpoint file")
    else:
        check_model_path(ModelSpec(path=path))


def load_policy(path: str, dtype: str | None, device):
    """(frozen model in eval mode on device, left-padding tokenizer) from a folder or a Lightning checkpoint."""
    from core.models import load_saved_causal_lm, load_tokenizer

    if path.endswith(".ckpt"):
        return load_checkpoint_policy(path, dtype, device)
    folder = Path(path).expanduser()
    model = load_saved_causal_lm(path, dtype or "float32", device).to(device)
    tokenizer_path = path
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not (folder / "tokenizer_config.json").is_file():  # an adapter saved without one
        tokenizer_path = json.loads(adapter.read_text())["base_model_name_or_path"]
    return model, load_tokenizer(tokenizer_path, padding_side="left")


def load_checkpoint_policy(path: str, dtype: str | None, device):
    """Rebuild a stage's policy from the checkpoint's `hyper_parameters["policy"]` (a ModelSpec dict) and load
    its `policy.*` weights; checkpoints hold trainable weights only, so exactly the rebuilt policy's trainable
    parameters must be there."""
    import torch

    from core.models import as_spec, freeze, load_causal_lm, load_tokenizer

    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    hparams, stage = ckpt.get("hyper_parameters") or {}, ckpt.get("stage", "unknown stage")
    if stage == "reward" or "backbone" in hparams:
        raise SystemExit(f"{PROG}: {path} is a reward-model checkpoint, not a policy: generate from a checkpoint "
                         "of rlhf sft, dpo, ppo or rs, or from a policy's exported folder")
    if not isinstance(hparams.get("policy"), dict) or "path" not in hparams["policy"]:
        raise SystemExit(f"{PROG}: {path} ({stage}) has no policy ModelSpec in its hyper_parameters: not a "
                         "checkpoint of rlhf sft, dpo, ppo or rs")
    spec = dataclasses.replace(as_spec(hparams["policy"]), gradient_checkpointing=False)
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)
    model = load_causal_lm(spec, device=device)  # the training-time structure (LoRA, train_top_layers)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    missing, unexpected = sorted(trainable - state.keys()), sorted(state.keys() - trainable)
    if missing or unexpected:
        raise SystemExit(f"{PROG}: {path} ({stage}) does not match the policy its hyper_parameters describe "
                         f"({spec.path}): missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} "
                         f"({len(unexpected)})")
    model.load_state_dict(state, strict=False)
    model = freeze(model) if spec.quantization != "none" else freeze(model).to(device)  # quantised: loaded there
    return model, load_tokenizer(spec, padding_side="left")


def encode_prompts(records, tokenizer, max_prompt_length: int | None) -> list[dict]:
    """Prompt records -> {"input_ids", "prompt" (rendered text), "meta", "index"} as PromptDataModule encodes
    them (chat template for messages, the tokenizer's special tokens, long prompts cut from the left)."""
    from core.tokenize import encode_prompts as encode

    return encode(records, tokenizer, max_prompt_length, limit_name="--max_prompt_length")


def finished_prompts(out: Path, rows: list[dict], k: int) -> int:
    """How many of `rows` (from the first) `out` already holds all k samples of, in order, matched by "index" (a
    part's indices start where the part does) and prompt text. A trailing partial prompt (or a line cut by a kill)
    is dropped by rewriting the file without it (atomically); rows that belong to another prompt file, part or
    --num_samples stop the run (DataError naming the line)."""
    from datamodules.formats import DataError

    if not out.exists():
        return 0
    # bytes: a kill may cut a multi-byte character (rows are written with ensure_ascii=False) in the last line
    lines = out.read_bytes().decode("utf-8", errors="surrogateescape").splitlines(keepends=True)
    good = 0
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line.encode("utf-8", errors="surrogateescape").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):  # the last line, cut mid-write
                break
            raise DataError(f"{out}:{number}", "not a JSON line", "the file is not an rlhf generate output") from None
        position, sample = divmod(good, k)
        expected = rows[position] if position < len(rows) else None
        if not (isinstance(row, dict) and expected is not None and row.get("index") == expected["index"]
                and row.get("sample") == sample and row.get("prompt") == expected["prompt"]):
            wanted = f"prompt {expected['index']} sample {sample}" if expected else "no more rows"
            raise DataError(f"{out}:{number}", "does not continue this run",
                            f"expected {wanted} of {len(rows)} prompts x {k} samples; "
                            "another --prompts, --part, --num_samples or model? use another --out")
        good += 1
    done = good // k
    keep = [line if line.endswith("\n") else line + "\n" for line in lines[: done * k]]
    if keep != lines:
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        tmp.write_bytes("".join(keep).encode("utf-8", errors="surrogateescape"))
        os.replace(tmp, out)
        print(f"{PROG}: {out}: dropped {len(lines) - len(keep)} line(s) of an unfinished prompt", file=sys.stderr)
    return done


def run(model, tokenizer, rows: list[dict], spec, out: Path, seed: int, batch_size: int, device,
        settings: dict | None = None) -> None:
    from core.generation import generate
    from datamodules.prompts import collate_prompts
    from modules.predict import batch_generator, response_rows

    k, total = spec.num_samples, len(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_prompts(out, rows, k)
    check_settings(out, settings, rows_written=out.exists() and out.stat().st_size > 0)
    if done == total:
        print(f"{PROG}: {out} already holds all {total} prompts x {k} samples", file=sys.stderr)
        return
    if done:
        print(f"{PROG}: {out}: continuing after {done} of {total} prompts", file=sys.stderr)
    eos = tokenizer.eos_token_id
    start, tokens, clock = time.perf_counter(), 0, None
    with out.open("a", encoding="utf-8") as f:
        # batches are fixed slices of all (the part's) prompts, so batch i (and its seed) is the same on every run;
        # a batch a resumed run enters midway (another --batch_size) is sampled whole and only its new prompts written
        for b in range(done // batch_size, (total + batch_size - 1) // batch_size):
            chunk = rows[b * batch_size : (b + 1) * batch_size]
            batch = collate_prompts(chunk, tokenizer.pad_token_id)
            rollout = generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), spec, eos,
                               tokenizer.pad_token_id, batch_generator(seed, b, device), tokenizer)
            answers = response_rows(tokenizer, rollout, [r["prompt"] for r in chunk], [r["index"] for r in chunk],
                                    [r["meta"] for r in chunk], k)
            for position, samples in enumerate(answers, b * batch_size):
                if position < done:  # a position in rows: a part's indices do not start at 0
                    continue
                for answer in samples:
                    f.write(json.dumps(answer, ensure_ascii=False, default=str) + "\n")
                    tokens += answer["tokens"]
            f.flush()
            clock = time.perf_counter() - start
            finished = min((b + 1) * batch_size, total)
            print(f"{PROG}: {finished}/{total} prompts, {tokens} tokens, {tokens / max(clock, 1e-9):.1f} tokens/s",
                  file=sys.stderr)
    print(f"{PROG}: wrote {out} ({total} prompts x {k} samples)", file=sys.stderr)


if __name__ == "__main__":
    main()
