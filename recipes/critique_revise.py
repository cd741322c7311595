"""`rlhf critique-revise`: the supervised stage of Constitutional AI (SL-CAI, Bai et al. 2022): a model answers each
prompt, then critiques its answer under a principle of a constitution and revises it; the revisions are SFT data.

    rlhf critique-revise --model models/SmolLM2-135M-Instruct \\
        --prompts ../shared/data/hh-rlhf-harmless/validation.jsonl \\
        --constitution configs/constitution/harmless.yaml --out runs/cai/revisions.jsonl \\
        --num_revisions 1 --max_new_tokens 96 --temperature 0.7 --device cpu
    rlhf sft fit --config configs/sft/smollm2-hh.yaml --data.train_file runs/cai/revisions.jsonl ...

Prompts come in any format `rlhf generate` reads (`prompt` text or chat messages, HH-RLHF `chosen`). For each
prompt the model answers; then, per revision, a principle is drawn by a generator seeded by (--seed, the prompt's
row), so a prompt gets the same principles on every run whatever the batch size; the model is asked the
principle's critique request and writes a critique, then is asked its revision request and writes a revision. The
conversation grows turn by turn as in the paper: prompt, answer, critique request, critique, revision request,
revision (then the next critique request, about the revision, ...).

With a chat template (the tokenizer's; --no_chat_template turns it off) the turns are chat messages: the prompt's
messages (an HH-RLHF string is split into its Human / Assistant turns), the answer as the assistant's, each request
as the user's. Without one the conversation is plain text: the prompt as `rlhf generate` renders it, the answer, then
the constitution's critique_template / revision_template with {request} filled in; sampling also stops at
"\\n\\nHuman:" and at the templates' openings (the text before {request}), cut from the reply.

Each output row is a demonstration `rlhf sft fit` reads: {"prompt": the prompt as read from --prompts (text or
messages: the SFT stage renders it as `rlhf generate` does, without the critique turns), "completion": the last
revision, "index": the prompt's row, "meta": {"initial", "critiques", "revisions", "principles", "blank_revisions",
"row": the prompt row's other columns}}. A revision that comes back blank keeps the previous answer (counted in
blank_revisions and reported); a prompt whose answer and revisions are all blank has no row (reported).
--eval_rows DIR also writes DIR/initial.jsonl and DIR/revised.jsonl, `rlhf generate` rows of the first answers and
of the last revisions (the prompt as `rlhf generate` renders it, without the critique turns), for
`rlhf eval --policy DIR/revised.jsonl --baseline DIR/initial.jsonl --judge RM`.

Each step (the answers, each critique, each revision) samples the prompts in batches of --batch_size, batch i of
step s from a generator seeded by (--seed, s, i). Each finished batch is saved to OUT.progress as it ends; a killed
run (or one stopped with Ctrl-C) continues from there when run again with the same settings, and writes exactly the
rows an uninterrupted run would (on the same device). Settings that change the saved work (the model's files, the
prompts, the constitution, the seed, sampling, batch size, ...) refuse to continue it and say which; --restart
discards it. --num_revisions may grow: the steps already saved are kept. The output is written whole when every
prompt is done (a tmp file renamed, never a partial file) and OUT.progress is then deleted.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from pathlib import Path

PROG = "rlhf critique-revise"
HUMAN_STOP = "\n\nHuman:"


def build_parser() -> argparse.ArgumentParser:
    """The flags alone (rlhf pipeline checks a critique-revise stage's args with it before anything runs)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder (merged or LoRA adapter) or a stage's .ckpt")
    parser.add_argument("--prompts", required=True,
                        help="prompt file (jsonl/json/csv/parquet), saved dataset or hub id")
    parser.add_argument("--constitution", required=True, help="constitution YAML (core/constitution.py)")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl of prompt/completion rows")
    parser.add_argument("--split", default="train", help="split of a saved or hub dataset")
    parser.add_argument("--num_revisions", type=int, default=1, help="critique-revision rounds per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="per answer, critique and revision")
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable); cut from replies")
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per batch")
    parser.add_argument("--max_prompt_length", type=int, default=None,
                        help="cut longer conversations from the left to this many tokens (default: no cut)")
    parser.add_argument("--no_chat_template", action="store_true",
                        help="plain-text conversation even when the tokenizer has a chat template")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--eval_rows", type=Path, default=None,
                        help="also write DIR/initial.jsonl and DIR/revised.jsonl as `rlhf generate` rows")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                        help="weight dtype (default: a checkpoint's own, float32 for a folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the progress an interrupted run saved (OUT.progress) and start afresh")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_revisions < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num_revisions, --batch_size and --max_new_tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    from core.generation import SamplingSpec

    try:  # bad sampling values stop here, before anything loads
        SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     stop_strings=list(args.stop))
    except ValueError as err:
        parser.error(str(err))

    from recipes.common import quiet

    quiet()
    import torch

    from core.constitution import load_constitution
    from core.outputs import Journal, progress_path, write_jsonl
    from datamodules.formats import read_prompts
    from recipes.generate import check_model_arg, load_policy

    constitution = load_constitution(args.constitution)  # a bad constitution stops here, before any weights load
    check_model_arg(args.model)
    records = read_prompts(args.prompts, args.split)
    records = records[: args.limit] if args.limit else list(records)
    journal = Journal(progress_path(args.out), "rlhf critique-revise", run_settings(args, constitution, records))
    saved = journal.open(restart=args.restart)  # progress of other settings stops here, before any weights load
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_policy(args.model, args.dtype, device)
    chat = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
    if saved:
        print(f"{PROG}: continuing: {saved} batch(es) saved in {journal.path}", file=sys.stderr)
    start = time.perf_counter()
    try:
        rows, stats = critique_revise(model, tokenizer, records, constitution, args, device, chat, journal)
    except KeyboardInterrupt:
        journal.close()
        print(f"{PROG}: interrupted; {len(journal.units)} batch(es) saved in {journal.path}: the same command "
              "continues", file=sys.stderr)
        raise
    write_jsonl(args.out, rows)
    evals = stats.pop("eval")
    if args.eval_rows is not None:
        for name in ("initial", "final"):
            write_jsonl(args.eval_rows / f"{'revised' if name == 'final' else name}.jsonl", [e[name] for e in evals])
    journal.remove()  # everything it saved is in the files now
    mode = "chat messages" if chat else "plain text"
    print(f"{PROG}: wrote {args.out} ({len(rows)} rows of {len(records)} prompts, {args.num_revisions} revision(s), "
          f"{mode}, {time.perf_counter() - start:.0f} s); blank answers {stats['blank_answers']}, blank critiques "
          f"{stats['blank_critiques']}, blank revisions {stats['blank_revisions']} (kept the previous answer), "
          f"prompts left out (all blank) {stats['dropped']}", file=sys.stderr)


def run_settings(args, constitution, records) -> dict:
    """What the saved batches depend on: a run with other values cannot continue them. The device is left out (a run
    may move to a GPU; its new batches then sample from the GPU's streams); --num_revisions too (steps are named, so
    more revisions reuse the saved ones); --eval_rows and --restart change no sample."""
    import dataclasses

    from core.outputs import config_hash, files_stamp

    return {"model": [args.model, files_stamp(args.model)], "dtype": args.dtype,
            "prompts": [args.prompts, args.split, args.limit, config_hash([r.prompt for r in records])],
            "constitution": config_hash(dataclasses.asdict(constitution)), "seed": args.seed,
            "sampling": [args.temperature, args.top_p, args.max_new_tokens, list(args.stop)],
            "batch_size": args.batch_size, "max_prompt_length": args.max_prompt_length,
            "no_chat_template": args.no_chat_template}


def choose_principles(seed: int, index: int, count: int, revisions: int) -> list[int]:
    """The principles (positions in the constitution) of prompt row `index`'s revisions: random.Random seeded by
    crc32 of repr(("critique-revise", seed, index)), one randrange(count) per revision. Keyed on the row alone, so
    the same on every run, whatever the batch size or --limit."""
    rng = random.Random(zlib.crc32(repr(("critique-revise", seed, index)).encode()))
    return [rng.randrange(count) for _ in range(revisions)]


def step_generator(seed: int, step: str, batch: int, device):
    """The sampling stream of batch `batch` of step `step` ("answer", "critique1", "revision1", ...)."""
    import torch

    return torch.Generator(device=device).manual_seed(zlib.crc32(repr((seed, step, batch)).encode()))


def hh_messages(prompt) -> list[dict]:
    """A prompt as chat messages: messages as they are; an HH-RLHF string ("\\n\\nHuman: ..\\n\\nAssistant: ..
    \\n\\nAssistant:") split into its turns, the empty last Assistant turn dropped; other text as one user turn."""
    from datamodules.formats import _TURN

    if not isinstance(prompt, str):
        return [dict(m) for m in prompt]
    turns = list(_TURN.finditer(prompt))
    if not turns:
        return [{"role": "user", "content": prompt.strip()}]
    messages = []
    head = prompt[: turns[0].start()].strip()
    for i, turn in enumerate(turns):
        end = turns[i + 1].start() if i + 1 < len(turns) else len(prompt)
        content = prompt[turn.end() : end].strip()
        role = "user" if turn.group(1) == "Human" else "assistant"
        if i == 0 and head:
            content = f"{head}\n\n{content}"
        messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The reply up to its first stop string (the stop string dropped), stripped."""
    ends = [text.find(s) for s in stops if s and s in text]
    return (text[: min(ends)] if ends else text).strip()


class Conversation:
    """One prompt's growing conversation: chat messages (rendered with the chat template) or plain text."""

    def __init__(self, prompt, tokenizer, chat: bool):
        from core.tokenize import render_prompt

        self.tokenizer, self.chat = tokenizer, chat
        self.messages = hh_messages(prompt) if chat else None
        self.text = None if chat else render_prompt(prompt, tokenizer)

    def render(self) -> str:
        """The text the model continues: the chat template with the assistant's turn opened, or the plain text."""
        if self.chat:
            return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return self.text

    def reply(self, text: str) -> None:
        """The model's turn (answer, critique or revision)."""
        if self.chat:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.text += (" " + text) if text else ""

    def ask(self, request: str, template: str) -> None:
        """A critique or revision request: the user's turn, or the template with {request} in plain text."""
        if self.chat:
            self.messages.append({"role": "user", "content": request})
        else:
            self.text += template.format(request=request)


def sample_step(model, tokenizer, texts: list[str], spec, seed: int, step: str, batch_size: int, device,
                max_prompt_length: int | None, stops: list[str], journal=None) -> list[tuple[str, str, int]]:
    """(reply cut at the stops, finish_reason, tokens) per conversation text, batch by batch; a batch the journal
    holds is read from it, a new one saved to it."""
    from core.generation import generate
    from datamodules.prompts import collate_prompts
    from modules.predict import response_rows

    bos = tokenizer.bos_token
    out = []
    for b in range(0, len(texts), batch_size):
        chunk = texts[b : b + batch_size]
        saved = journal.get(step, b // batch_size) if journal is not None else None
        if saved is not None:
            out.extend(tuple(reply) for reply in saved)
            continue
        # a chat template that writes BOS itself must not get a second one from the tokenizer
        add = not (bos and all(t.startswith(bos) for t in chunk))
        ids = tokenizer(chunk, add_special_tokens=add)["input_ids"]
        if max_prompt_length is not None:
            ids = [i[-max_prompt_length:] for i in ids]  # the end of a conversation is what the reply answers
        batch = collate_prompts([{"input_ids": i, "prompt": t, "meta": {}} for i, t in zip(ids, chunk)],
                                tokenizer.pad_token_id)
        rollout = generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), spec,
                           tokenizer.eos_token_id, tokenizer.pad_token_id,
                           step_generator(seed, step, b // batch_size, device), tokenizer)
        replies = [(cut_at_stops(row["response"], stops), row["finish_reason"], row["tokens"])
                   for [row] in response_rows(tokenizer, rollout, chunk, list(range(len(chunk))), [{}] * len(chunk), 1)]
        if journal is not None:
            journal.put((step, b // batch_size), replies)
        out.extend(replies)
    return out


def critique_revise(model, tokenizer, records, constitution, args, device, chat: bool,
                    journal=None) -> tuple[list[dict], dict]:
    """(output rows, stats) for the prompt records: answers, then per revision a critique and a revision each,
    every step batched over all prompts (batches the journal saved are read from it)."""
    from core.generation import SamplingSpec
    from core.tokenize import render_prompt

    stops = list(args.stop)
    if not chat:
        stops += [HUMAN_STOP, *(t.split("{request}")[0] for t in (constitution.critique_template,
                                                                  constitution.revision_template))]
        stops = [s for s in dict.fromkeys(stops) if s.strip()]
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_strings=stops)
    principles = constitution.principles
    conversations = [Conversation(r.prompt, tokenizer, chat) for r in records]
    rendered_prompts = [render_prompt(r.prompt, tokenizer) for r in records]  # as `rlhf generate` writes them
    chosen = [choose_principles(args.seed, i, len(principles), args.num_revisions) for i in range(len(records))]
    stats = {"blank_answers": 0, "blank_critiques": 0, "blank_revisions": 0, "dropped": 0}

    def step(name: str) -> list[tuple[str, str, int]]:
        started = time.perf_counter()
        replies = sample_step(model, tokenizer, [c.render() for c in conversations], spec, args.seed, name,
                              args.batch_size, device, args.max_prompt_length, stops, journal=journal)
        print(f"{PROG}: {name}: {len(replies)} replies, {sum(r[2] for r in replies)} tokens, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        return replies

    answers = step("answer")
    current = [a[0] for a in answers]
    initial = [(a[0], a[1], a[2]) for a in answers]
    stats["blank_answers"] = sum(not a for a in current)
    for c, text in zip(conversations, current):
        c.reply(text)
    critiques: list[list[str]] = [[] for _ in records]
    revisions: list[list[str]] = [[] for _ in records]
    blanks = [0] * len(records)
    last = list(initial)
    for r in range(args.num_revisions):
        for c, picks in zip(conversations, chosen):
            c.ask(principles[picks[r]].critique, constitution.critique_template)
        for i, (c, (text, _, _)) in enumerate(zip(conversations, step(f"critique{r + 1}"))):
            critiques[i].append(text)
            stats["blank_critiques"] += not text
            c.reply(text)
        for c, picks in zip(conversations, chosen):
            c.ask(principles[picks[r]].revision, constitution.revision_template)
        for i, (c, reply) in enumerate(zip(conversations, step(f"revision{r + 1}"))):
            text = reply[0]
            revisions[i].append(text)
            if not text:  # a blank revision keeps the previous answer
                blanks[i] += 1
                stats["blank_revisions"] += 1
            else:
                current[i], last[i] = text, reply
            c.reply(current[i])
    rows, evals = [], []
    for i, record in enumerate(records):
        meta = {"initial": initial[i][0], "critiques": critiques[i], "revisions": revisions[i],
                "principles": [principles[p].name for p in chosen[i]], "blank_revisions": blanks[i],
                "row": dict(record.meta)}
        evals.append({name: {"prompt": rendered_prompts[i], "response": reply_text(rendered_prompts[i], text),
                             "sample": 0, "finish_reason": reason, "tokens": tokens, "index": i,
                             "meta": {"principles": meta["principles"]}}
                      for name, (text, reason, tokens) in (("initial", initial[i]), ("final", last[i]))})
        if not current[i]:
            stats["dropped"] += 1
            continue
        completion = reply_text(record.prompt, current[i])
        rows.append({"prompt": record.prompt, "completion": completion, "index": i, "meta": meta})
    stats["eval"] = evals
    return rows, stats


def reply_text(prompt, text: str) -> str:
    """A reply as it follows its prompt in a file: after a text prompt ending in a non-space (HH-RLHF's
    "Assistant:") it starts with a space, as HH-RLHF writes replies and a tokenizer sees them in training."""
    if text and isinstance(prompt, str) and not prompt[-1:].isspace() and not text[:1].isspace():
        return " " + text
    return text


if __name__ == "__main__":
    main()
