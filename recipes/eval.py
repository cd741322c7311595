"""`rlhf eval`: judge a policy's generation file against a baseline's, and measure its KL to a reference model.

    rlhf generate --model runs/ppo/tiny/hf_model --prompts prompts_val.jsonl --out ppo.jsonl
    rlhf generate --model runs/sft/tiny/hf_model --prompts prompts_val.jsonl --out sft.jsonl
    rlhf eval --policy ppo.jsonl --baseline sft.jsonl --judge '{oracle: synthetic}' --out eval/ppo \\
        --policy_model runs/ppo/tiny/hf_model --reference_model runs/sft/tiny/hf_model

Or give models and prompts: each of --policy / --baseline that is a model (a folder or a .ckpt, as `rlhf generate
--model` takes) is sampled first into OUT/policy.jsonl / OUT/baseline.jsonl, on --prompts with --num_samples,
--temperature, --max_new_tokens, --seed, --batch_size (a model --policy is also the KL's --policy_model):

    rlhf eval --policy runs/ppo/tiny/hf_model --baseline runs/sft/tiny/hf_model --prompts prompts_val.jsonl \\
        --judge '{oracle: synthetic}' --reference_model runs/sft/tiny/hf_model --out eval/ppo

Inputs are `rlhf generate` files (rows {prompt, response, sample, finish_reason, tokens, meta}); policy and
baseline rows are paired by (prompt, sample) (no sample field: the row's rank among rows of that prompt), and by the
prompt's row in the prompt file (`index`) when every row of both files has one, as a prompt may appear twice.
--judge is a RewardSpec as YAML/JSON text or a file holding it (`{oracle: synthetic}`, `{models: [runs/rm]}`,
`{functions: ["pkg.mod:fn"]}`), or a reward-model folder. Both files are scored in one call, so a judge that
whitens with batch statistics puts them on one scale. --pairwise_judge is a JudgeSpec
(core/judge.py: a causal LM asked which response is better, both orders averaged) as YAML/JSON text or a file
(`{model: runs/sft}`, `{model: M, constitution: configs/constitution/harmless.yaml}`), or a causal LM's folder; it
needs --baseline and may come with --judge. Writes OUT/eval.json (every number, interval and
count) and OUT/eval.md (a table, also printed). Methods (core/losses/eval.py):
  win rate    (wins + ties/2) / pairs, Wilson 95% score interval over the pairs (conservative with ties);
              a tie is |policy - baseline| <= --tie_tolerance, or the same response text
  pairwise    win rate = mean over pairs of P(policy beats baseline) from --pairwise_judge, with mean -/+ 1.96
              standard errors of the per-pair probabilities (the judge's own uncertainty counts, no threshold);
              also its hard decisions (a win where P > 0.5, a tie within --tie_tolerance of 0.5) with the
              Wilson interval as above, and the judge's position bias (mean P(first option), 0.5 = none)
  judge score mean of each file with mean -/+ 1.96 standard errors
  KL          nats per response, mean over the policy file's samples of
              log pi(response|prompt) - log ref(response|prompt) (k1, unbiased when the file was sampled
              from --policy_model at --temperature without top-p/top-k), with its standard error. Text is
              re-tokenized (prompt, then prompt+response, as in training; the response alone where a token
              would merge across the boundary), plus EOS where finish_reason is eos. With K > 1 samples per
              prompt every interval's standard error is clustered by prompt (core/losses/eval.py).
  length, distinct-1/2   over whitespace words of the responses; EOS rate from finish_reason
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

PROG = "rlhf eval"


def main(argv: list[str] | None = None) -> None:
    args, judge = parse_args(argv)  # a bad spec fails before anything loads
    from recipes.common import quiet

    quiet()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    generate_inputs(args, device)
    result = evaluate(args, judge, device)
    table = write_outputs(result, args.out)
    print(table)
    print(f"{PROG}: wrote {args.out / 'eval.json'} and {args.out / 'eval.md'}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The flags alone (rlhf pipeline checks an eval stage's args with it before anything runs)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="the policy's generation file (.jsonl), or a model to sample")
    parser.add_argument("--baseline", help="the baseline's generation file on the same prompts, or a model (win rate)")
    parser.add_argument("--judge", help="RewardSpec as YAML/JSON text or a file, or a reward-model folder")
    parser.add_argument("--pairwise_judge",
                        help="JudgeSpec (an LM asked which response is better) as YAML/JSON text or a file, or a "
                             "causal LM's folder: the pairwise win rate")
    parser.add_argument("--out", type=Path, required=True, help="folder for eval.json and eval.md")
    parser.add_argument("--policy_model", help="the model that wrote --policy (for the KL; default: a model --policy)")
    parser.add_argument("--reference_model", help="the reference model of the KL (e.g. the SFT policy)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of --policy (KL), and of the models sampled here")
    parser.add_argument("--tie_tolerance", type=float, default=0.0, help="|score difference| counted as a tie")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights of the KL models and the models sampled here")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (KL) and prompts per batch")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    sampling = parser.add_argument_group("sampling, when --policy or --baseline is a model")
    sampling.add_argument("--prompts", help="prompt file (any format `rlhf generate` reads)")
    sampling.add_argument("--num_samples", type=int, default=1, help="responses per prompt")
    sampling.add_argument("--max_new_tokens", type=int, default=128)
    sampling.add_argument("--seed", type=int, default=0, help="both models sample from the same seeds")
    return parser


def parse_args(argv: list[str] | None = None):
    """(args, RewardSpec or None); usage errors exit 2 before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_samples < 1 or args.max_new_tokens < 1:
        parser.error("--batch_size, --num_samples and --max_new_tokens must be at least 1")
    models = [name for name in ("policy", "baseline") if getattr(args, name) and is_model(getattr(args, name))]
    if models and not args.prompts:
        parser.error(f"--{models[0]} {getattr(args, models[0])} is a model: sampling it needs --prompts")
    if "policy" in models and args.policy_model is None and args.reference_model is not None:
        args.policy_model = args.policy  # the KL's policy is the model that writes the samples
    if (args.policy_model is None) != (args.reference_model is None):
        parser.error("--policy_model and --reference_model come together (the KL needs both)")
    if args.baseline and not (args.judge or args.pairwise_judge):
        parser.error("--baseline needs --judge or --pairwise_judge: the win rate compares judge scores")
    if args.pairwise_judge and not args.baseline:
        parser.error("--pairwise_judge needs --baseline: it compares the policy's responses with the baseline's")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0: greedy samples have no Monte-Carlo KL")
    if args.tie_tolerance < 0:
        parser.error("--tie_tolerance must be >= 0")
    args.models = {name: getattr(args, name) for name in models}
    args.pairwise = None
    if args.pairwise_judge:
        from core.judge import as_judge_spec

        try:
            args.pairwise = as_judge_spec(args.pairwise_judge)
        except ValueError as err:
            parser.error(f"--pairwise_judge: {err}")
    return args, read_judge(parser, args.judge) if args.judge else None


def is_model(path: str) -> bool:
    """A folder, a .ckpt or a hub id is a model; an existing file (or a .jsonl/.json name) is a generation file."""
    p = Path(path).expanduser()
    return p.is_dir() or path.endswith(".ckpt") or not (p.is_file() or path.endswith((".jsonl", ".json")))


def generate_inputs(args, device: str) -> None:
    """Sample each model in args.models into OUT/<side>.jsonl (recipes/generate.py, a fresh file each time) and
    point args.<side> at it."""
    from core.generation import SamplingSpec
    from datamodules.formats import read_prompts
    from recipes.generate import check_model_arg, encode_prompts, load_policy, run

    if not args.models:
        return
    for path in args.models.values():
        check_model_arg(path)  # both paths checked before any weights load
    records = read_prompts(args.prompts)
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        num_samples=args.num_samples)
    args.out.mkdir(parents=True, exist_ok=True)
    for side, path in args.models.items():
        out = args.out / f"{side}.jsonl"
        out.unlink(missing_ok=True)  # never continue a file another model wrote
        model, tokenizer = load_policy(path, args.dtype, device)
        run(model, tokenizer, encode_prompts(records, tokenizer, None), spec, out, args.seed, args.batch_size, device)
        del model
        setattr(args, side, str(out))


def read_judge(parser: argparse.ArgumentParser, text: str):
    """--judge text -> RewardSpec: YAML/JSON (a file's or the argument's own), or a reward-model folder."""
    import yaml

    from core.reward_spec import as_reward_spec

    path = Path(text).expanduser()
    if path.is_dir():
        value = {"models": [text]}
    else:
        try:
            value = yaml.safe_load(path.read_text() if path.is_file() else text)
        except yaml.YAMLError as err:
            parser.error(f"--judge: not YAML/JSON text, a file or a folder: {' '.join(str(err).split())}")
    if not isinstance(value, dict):
        parser.error(f"--judge: {text!r} is no file or folder, nor a YAML/JSON mapping such as '{{oracle: synthetic}}'")
    try:
        return as_reward_spec(value)
    except (TypeError, ValueError) as err:
        parser.error(f"--judge: {err}")


def read_generations(path: str) -> list[dict]:
    """Rows of a generation file: {prompt, response, sample, finish_reason, tokens, meta, where}; a row
    without `sample` gets its rank among the rows of its prompt. Bad or repeated rows: DataError naming them."""
    from datamodules.formats import DataError, iter_rows, text_field

    rows, seen, ranks = [], {}, {}
    for where, row in iter_rows(path):
        prompt = text_field(row, "prompt", where)
        response = row.get("response")
        if not isinstance(response, str):  # may be empty: the model can say EOS first
            raise DataError(where, "missing field 'response'" if response is None
                            else "field 'response' is not a string")
        sample = row.get("sample", ranks.get(prompt, 0))
        if not isinstance(sample, int) or isinstance(sample, bool):
            raise DataError(where, "field 'sample' is not an integer", f"got {sample!r}")
        ranks[prompt] = ranks.get(prompt, 0) + 1
        index = row.get("index") if isinstance(row.get("index"), int) else None  # a prompt file may repeat a prompt
        if (prompt, sample, index) in seen:
            raise DataError(where, "repeated (prompt, sample)", f"first at {seen[prompt, sample, index]}")
        seen[prompt, sample, index] = where
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        rows.append({"prompt": prompt, "response": response, "sample": sample, "where": where, "meta": meta,
                     "finish_reason": row.get("finish_reason"), "tokens": row.get("tokens"), "index": index})
    if not rows:
        raise DataError(path, "no rows")
    return rows


def evaluate(args, judge, device: str) -> dict:
    import torch

    from core.losses.eval import mean_interval, win_tie_loss

    policy = read_generations(args.policy)
    baseline = read_generations(args.baseline) if args.baseline else []
    models = getattr(args, "models", {})
    result = {"policy": {"file": args.policy, **model_of(models, "policy"), **describe(policy)}, "confidence": 0.95}
    if baseline:
        result["baseline"] = {"file": args.baseline, **model_of(models, "baseline"), **describe(baseline)}
    pairs = pair_rows(policy, baseline, args) if baseline else []  # (policy row, baseline row)
    if judge is not None:
        judge.load(device)
        both = policy + baseline  # one call: batch whitening puts both files on one scale
        scores = judge.score([r["prompt"] for r in both], [r["response"] for r in both], [r["meta"] for r in both])
        mine, theirs = scores[: len(policy)].double(), scores[len(policy) :].double()  # (n_policy,), (n_baseline,)
        result["judge"] = {"spec": args.judge, "tie_tolerance": args.tie_tolerance}
        result["policy"]["score"] = mean_interval(mine, clusters=prompt_keys(policy))._asdict()
        if baseline:
            result["baseline"]["score"] = mean_interval(theirs, clusters=prompt_keys(baseline))._asdict()
            mine_i, theirs_i = torch.tensor([p for p, _ in pairs]), torch.tensor([b for _, b in pairs])
            ours, others = mine[mine_i], theirs[theirs_i].clone()
            # the same text is a tie whatever the judge says: a model scores one text a little differently
            # from batch to batch (padding), which would make wins and losses of identical answers
            same = torch.tensor([policy[p]["response"] == baseline[b]["response"] for p, b in pairs])
            others[same] = ours[same]
            clusters = prompt_keys([policy[p] for p, _ in pairs])
            won = win_tie_loss(ours, others, args.tie_tolerance, clusters=clusters)
            result["win_rate"] = {**won._asdict(), "method": interval_method(clusters),
                                  "identical_pairs": int(same.sum()),
                                  "unpaired_policy": len(policy) - len(pairs),
                                  "unpaired_baseline": len(baseline) - len(pairs)}
    if baseline and getattr(args, "pairwise", None) is not None:
        result["pairwise"] = pairwise_win_rate(policy, baseline, pairs, args, device)
    if args.policy_model:
        result["kl"] = {**policy_kl(policy, args, device)._asdict(), "policy_model": args.policy_model,
                        "reference_model": args.reference_model, "temperature": args.temperature}
    return result


def pair_rows(policy: list[dict], baseline: list[dict], args) -> list[tuple[int, int]]:
    """(policy row, baseline row) of each (prompt, sample) both files hold, one to one (a key two policy rows share,
    as when only one file has `index`, pairs in file order, never one baseline row twice); none: DataError."""
    indexed = all(r["index"] is not None for r in policy + baseline)
    free: dict[tuple, list[int]] = {}
    for i, r in enumerate(baseline):
        free.setdefault(pair_key(r, indexed), []).append(i)
    pairs = []
    for i, r in enumerate(policy):
        rows = free.get(pair_key(r, indexed))
        if rows:
            pairs.append((i, rows.pop(0)))
    if not pairs:
        from datamodules.formats import DataError

        raise DataError(args.baseline, "no (prompt, sample) in common with --policy", args.policy)
    if len(pairs) < max(len(policy), len(baseline)):
        print(f"{PROG}: {len(pairs)} pairs; unpaired rows: {len(policy) - len(pairs)} policy, "
              f"{len(baseline) - len(pairs)} baseline", file=sys.stderr)
    return pairs


def pairwise_win_rate(policy: list[dict], baseline: list[dict], pairs: list[tuple[int, int]], args,
                      device: str) -> dict:
    """--pairwise_judge over the pairs: the mean of P(policy beats baseline) with mean -/+ z standard errors, its
    hard decisions (P > 0.5 wins, within --tie_tolerance of 0.5 ties) with the Wilson interval, position bias."""
    import torch

    from core.judge import position_bias
    from core.losses.eval import mean_interval, win_tie_loss

    judge = args.pairwise.load(device)
    pref = judge.compare([policy[p]["prompt"] for p, _ in pairs], [policy[p]["response"] for p, _ in pairs],
                         [baseline[b]["response"] for _, b in pairs])
    clusters = prompt_keys([policy[p] for p, _ in pairs])
    mean = mean_interval(pref.prob, clusters=clusters)
    decided = win_tie_loss(pref.prob, torch.full_like(pref.prob, 0.5), args.tie_tolerance, clusters=clusters)
    return {"spec": args.pairwise_judge, "win_rate": mean.mean, "low": max(0.0, mean.low),
            "high": min(1.0, mean.high), "stderr": mean.stderr, "n": mean.n,
            "method": "mean over pairs of P(policy beats baseline), both orders averaged; mean -/+ z * stderr",
            "decisions": {**decided._asdict(), "method": "P > 0.5 a win, |P - 0.5| <= tie_tolerance a tie; "
                          + interval_method(clusters)},
            "position_bias": position_bias(pref), "policy_first_mean": float(pref.p1.mean()),
            "policy_second_mean": float(pref.p2.mean()), "unpaired_policy": len(policy) - len(pairs),
            "unpaired_baseline": len(baseline) - len(pairs)}


def prompt_keys(rows: list[dict]) -> list[tuple]:
    """Each row's prompt (text and row in the prompt file): the clusters of K samples of one prompt."""
    return [(r["prompt"], r["index"]) for r in rows]


def interval_method(clusters: list) -> str:
    if len(set(clusters)) < len(clusters):
        return ("(wins + ties/2) / n, Wilson score interval over n_effective trials (K samples of one prompt are "
                "not independent: design effect of the standard error clustered by prompt)")
    return "(wins + ties/2) / n, Wilson score interval"


def pair_key(row: dict, indexed: bool) -> tuple:
    """(prompt, sample), plus the prompt's row in the prompt file when every row of both files carries it
    (`rlhf generate` files): a prompt file may hold one prompt twice."""
    return (row["prompt"], row["sample"], row["index"] if indexed else None)


def model_of(models: dict, side: str) -> dict:
    return {"model": models[side]} if side in models else {}


def describe(rows: list[dict]) -> dict:
    """Length, distinct-1/2 over whitespace words; EOS rate (finish_reason) and mean tokens where every row has them."""
    from core.losses.eval import text_stats

    reasons = [r["finish_reason"] for r in rows]
    eos = [x == "eos" for x in reasons] if all(isinstance(x, str) for x in reasons) else None
    stats = text_stats([r["response"].split() for r in rows], eos)._asdict()
    tokens = [r["tokens"] for r in rows]
    stats["mean_tokens"] = sum(tokens) / len(tokens) if all(isinstance(t, int) for t in tokens) else None
    return stats


def policy_kl(rows: list[dict], args, device: str):
    """KL(policy || reference) over the rows' responses (core.losses.eval.sequence_kl); each model is a
    folder or a .ckpt, loaded one at a time."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from core.losses.eval import sequence_kl
    from recipes.generate import load_policy

    logps, vocab = [], None
    for path in (args.policy_model, args.reference_model):
        model, tokenizer = load_policy(path, args.dtype, device)
        if vocab is None:  # the tokenizer follows the policy; the reference must share it
            vocab, encoded, pad = tokenizer.get_vocab(), encode_responses(tokenizer, rows), tokenizer.pad_token_id
        elif tokenizer.get_vocab() != vocab:
            raise ValueError(f"{args.reference_model} has another vocabulary than {args.policy_model}: "
                             "no token-level KL")
        logps.append(response_logps(model, encoded, pad, args, device))
        del model
    lengths = torch.tensor([len(r) for _, r in encoded])  # (n,)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (n, t): response tokens
    padded = [pad_sequence(x, batch_first=True) if lengths.max() else torch.zeros(len(x), 0) for x in logps]
    return sequence_kl(padded[0], padded[1], mask, clusters=prompt_keys(rows))


def encode_responses(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row from one tokenization (core/tokenize.py's contract), EOS appended
    where sampling ended with it (finish_reason "eos"). Where a token merges across the boundary (a prompt ending
    in a space, "Answer: "), the prompt's tokens are no prefix of prompt+response's; the model sampled the response
    after the prompt's own tokens, so the response is tokenized on its own and appended (counted, reported)."""
    prompts = [r["prompt"] for r in rows]
    fulls = [r["prompt"] + r["response"] for r in rows]
    bos = tokenizer.bos_token
    add = not (bos and all(t.startswith(bos) for t in prompts))  # a chat template may have written BOS
    out, apart = [], 0
    for row, p, f in zip(rows, tokenizer(prompts, add_special_tokens=add)["input_ids"],
                         tokenizer(fulls, add_special_tokens=add)["input_ids"]):
        if f[: len(p)] == p:
            response = f[len(p) :]
        else:
            response, apart = tokenizer(row["response"], add_special_tokens=False)["input_ids"], apart + 1
        eos = [tokenizer.eos_token_id] if row["finish_reason"] == "eos" else []
        out.append((p, response + eos))
    if apart:
        print(f"{PROG}: KL: {apart} of {len(rows)} responses tokenized apart from their prompt (a token merges "
              "across the boundary)", file=sys.stderr)
    return out


def response_logps(model, encoded: list[tuple[list[int], list[int]]], pad_id: int, args, device: str) -> list:
    """One model's log-prob of each response token, batched on right-padded rows: a (len(response),) tensor per row."""
    import torch

    from core.batches import PaddedRows
    from core.forward import completion_logps
    from core.packing import pad_completions

    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), args.batch_size):
            chunk = encoded[start : start + args.batch_size]
            rows = pad_completions(chunk, pad_id)  # labels: response tokens only
            batch = PaddedRows(rows.input_ids.to(device), rows.attention_mask.to(device), rows.labels.to(device))
            flat = completion_logps(model, batch, args.temperature).tokens.double().cpu()  # (n,)
            out.extend(flat.split([len(r) for _, r in chunk]))
    return out


def finite(value):
    """nan/inf -> None, so eval.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def write_outputs(result: dict, out: Path) -> str:
    """OUT/eval.json and OUT/eval.md; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval.json", json.dumps(finite(result), indent=2) + "\n")
    table = markdown(result)
    write_text(out / "eval.md", table)
    return table


def markdown(result: dict) -> str:
    def num(x, digits=3):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"

    def ci(d):
        return f"{num(d['mean'])} [{num(d['low'])}, {num(d['high'])}]" if d else "n/a"

    sides = [s for s in ("policy", "baseline") if s in result]
    lines = ["| | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    rows = [("judge score, 95% CI", lambda d: ci(d.get("score"))), ("n", lambda d: str(d["n"])),
            ("mean length (words)", lambda d: num(d["mean_length"], 1)),
            ("mean tokens", lambda d: num(d["mean_tokens"], 1)), ("EOS rate", lambda d: num(d["eos_rate"])),
            ("distinct-1", lambda d: num(d["distinct_1"])), ("distinct-2", lambda d: num(d["distinct_2"]))]
    lines += [f"| {name} | " + " | ".join(get(result[s]) for s in sides) + " |" for name, get in rows]
    text = "\n".join(lines) + "\n"
    if "win_rate" in result:
        w = result["win_rate"]
        text += (f"\nWin rate of policy vs baseline: **{num(w['win_rate'])}** [{num(w['low'])}, {num(w['high'])}] "
                 f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses of {w['n']} pairs; ties count half; "
                 f"Wilson 95% interval" + (f" over {w['n_effective']:.1f} effective pairs: samples of one prompt "
                                           "are not independent" if w["n_effective"] < w["n"] else "") + ")\n")
    if "pairwise" in result:
        w, d = result["pairwise"], result["pairwise"]["decisions"]
        text += (f"\nPairwise judge: P(policy beats baseline) **{num(w['win_rate'])}** [{num(w['low'])}, "
                 f"{num(w['high'])}] (mean of {w['n']} pairs, both orders averaged, mean -/+ 1.96 SE); decisions "
                 f"{num(d['win_rate'])} [{num(d['low'])}, {num(d['high'])}] ({d['wins']} wins, {d['ties']} ties, "
                 f"{d['losses']} losses; Wilson); position bias {num(w['position_bias'])}\n")
    if "kl" in result:
        k = result["kl"]
        text += (f"\nKL(policy || reference): **{num(k['kl'])}** nats per response, standard error "
                 f"{num(k['stderr'])} ({k['n']} samples)\n")
    return text


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # renamed over path: never a half-written file
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
