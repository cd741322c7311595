"""TRL as a client of our reward models (issue 18): GRPOTrainer scores its completions with a reward model saved by
`rlhf reward fit` (`reward_funcs=<folder>`), and we check that TRL's rewards equal RewardSpec.score of the same
completions. Our code does not import in TRL's venv (no Lightning there), so it runs in three steps, two
interpreters:

    .venv/bin/python benchmarks/trl_reward_client.py prepare --out /tmp/trl-client      # our venv: train and save
    /tmp/trlvenv/bin/python benchmarks/trl_reward_client.py trl --out /tmp/trl-client   # TRL: 2 GRPO steps per model
    .venv/bin/python benchmarks/trl_reward_client.py compare --out /tmp/trl-client      # our venv: score, compare
    .venv/bin/python benchmarks/trl_reward_client.py all --out /tmp/trl-client --trl-python /tmp/trlvenv/bin/python

prepare: a base (the committed tiny Llama with no pad token of its own, so pad == EOS, and a chat template whose
turns end in EOS), a policy `rlhf sft fit` from it (60 steps), and two reward models `rlhf reward fit` (20 steps):
`rm` from the tiny Llama on plain-text pairs, `rm_chat` from the chat base on chat-message pairs (its tokenizer's pad
was EOS, so the export gets a pad token of its own). trl: GRPOTrainer with the policy, reward_funcs = the folder,
2 steps of 4 completions (2 prompts x 2), plain-text prompts for `rm` and chat-message prompts for `rm_chat` (TRL
then renders prompt + completion through the reward tokenizer's chat template, ending in the end-of-turn token);
its `_calculate_rewards` is wrapped to record each completion with the reward TRL computed. compare: RewardSpec.score
on the same texts (plain: prompt, completion; chat: the rendered conversation), the largest difference, and what
the old scoring (prompt + response + EOS) would have given. Results go to OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RUNS = {"rm": False, "rm_chat": True}  # reward model -> conversational prompts


def rlhf(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "recipes.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def prepare(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    base = out / "chat-base"
    shutil.copytree(ROOT / "tests/fixtures/tiny-llama", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config["chat_template"] = CHAT_TEMPLATE
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    synthetic = ROOT / "tests/fixtures/synthetic"
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (synthetic / f"pairs_{split}.jsonl").read_text().splitlines()]
        with (out / f"chat_{split}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n")

    def fit(stage: str, name: str, *args: str) -> None:
        run = out / f"{name}.run"
        rlhf(stage, "fit", "--config", f"configs/{stage}/tiny.yaml", "--trainer.limit_val_batches=0",
             f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
             f"--model.save_dir={out / name}", *args)

    fit("sft", "policy", f"--model.policy.path={base}", "--trainer.max_steps=60")
    fit("reward", "rm")
    fit("reward", "rm_chat", f"--model.backbone.path={base}", f"--data.train_file={out / 'chat_train.jsonl'}",
        f"--data.val_file={out / 'chat_val.jsonl'}")
    prompts = [json.loads(line)["prompt"] for line in (synthetic / "prompts_val.jsonl").read_text().splitlines()]
    (out / "prompts.json").write_text(json.dumps(prompts[:4]))
    print(f"prepared {out}: policy, rm, rm_chat")


def run_trl(out: Path) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    prompts = json.loads((out / "prompts.json").read_text())
    runs = {}
    for name, chat in RUNS.items():
        rows = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in prompts]
        config = GRPOConfig(
            output_dir=str(out / f"trl-{name}"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
            steps_per_generation=1, num_generations=2, max_completion_length=8, temperature=1.0, max_steps=2,
            beta=0.0, learning_rate=1e-4, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        )
        trainer = GRPOTrainer(model=str(out / "policy"), reward_funcs=str(out / name), args=config,
                              train_dataset=Dataset.from_list(rows))
        seen = []
        calculate = trainer._calculate_rewards

        def recording(inputs, prompts_, completions, completion_ids_list, calculate=calculate, seen=seen):
            rewards = calculate(inputs, prompts_, completions, completion_ids_list)  # (n, reward funcs)
            seen.extend({"prompt": p, "completion": c, "trl_reward": float(r)}
                        for p, c, r in zip(prompts_, completions, rewards[:, 0].tolist()))
            return rewards

        trainer._calculate_rewards = recording
        trainer.train()
        key = f"rewards/{name}/mean"
        logged = [h[key] for h in trainer.state.log_history if key in h]
        reward_tok = trainer.reward_processing_classes[0]
        runs[name] = {"conversational": chat, "completions": seen, "logged_reward_means": logged,
                      "reward_pad_token": reward_tok.pad_token, "reward_pad_token_id": reward_tok.pad_token_id,
                      "reward_config_pad_token_id": trainer.reward_funcs[0].config.pad_token_id}
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    (out / "trl.json").write_text(json.dumps({"versions": versions, "runs": runs}, indent=1))
    print(f"TRL {trl.__version__}: {sum(len(r['completions']) for r in runs.values())} completions -> {out}/trl.json")


def compare(out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from core.models import ModelSpec, load_tokenizer
    from core.outputs import MARKER
    from core.reward_spec import RewardSpec

    got = json.loads((out / "trl.json").read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "trl_venv": got["versions"],
              "ours": {"transformers": transformers.__version__, "torch": torch.__version__}, "runs": {}}
    for name, run in got["runs"].items():
        path = out / name
        rows = run["completions"]
        if run["conversational"]:  # TRL's text: the whole conversation through the reward tokenizer's template
            tok = load_tokenizer(str(path))
            prompts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
            responses = [""] * len(rows)
        else:
            prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        ours = RewardSpec(models=[ModelSpec(path=str(path))]).load().score(prompts, responses)
        old = out / f"{name}-old"  # the same weights scored the old way: no score_at, prompt + response + EOS
        shutil.copytree(path, old, dirs_exist_ok=True)
        marker = json.loads((old / MARKER).read_text())
        marker.pop("score_at", None)
        (old / MARKER).write_text(json.dumps(marker))
        before = RewardSpec(models=[ModelSpec(path=str(old))]).load().score(prompts, responses)
        theirs = torch.tensor([r["trl_reward"] for r in rows])
        pad_eos = trl_call_with_pad_eos(path, [p + r for p, r in zip(prompts, responses)])
        steps = len(run["logged_reward_means"])
        per_step = [float(x) for x in ours.view(steps, -1).mean(1)] if steps and len(rows) % steps == 0 else []
        result["runs"][name] = {
            "conversational": run["conversational"], "completions": len(rows),
            "distinct_completions": len({json.dumps(r["completion"]) for r in rows}),
            "reward_pad": [run["reward_pad_token"], run["reward_pad_token_id"], run["reward_config_pad_token_id"]],
            "max_abs_diff_trl_vs_ours": float((theirs - ours).abs().max()),
            "trl_logged_means": run["logged_reward_means"], "our_means_per_step": per_step,
            "max_abs_diff_trl_vs_old_eos_scoring": float((theirs - before).abs().max()),
            "max_abs_diff_trl_call_if_pad_were_eos": float((pad_eos - ours).abs().max()),
            "score_range": [float(ours.min()), float(ours.max())],
            "example": {"text": prompts[0] + responses[0], "trl": float(theirs[0]), "ours": float(ours[0])},
        }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    worst = max(r["max_abs_diff_trl_vs_ours"] for r in result["runs"].values())
    print(f"largest |TRL - RewardSpec| over all completions: {worst:.2e}")
    return result


def trl_call_with_pad_eos(path: Path, texts: list[str]):
    """TRL's reward call on `texts` had the saved pad been EOS (what the export would be without a pad of its own):
    a text ending in EOS (the chat template's end-of-turn token) is then read one token early."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "trl", "compare", "all"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/trl-client"))
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="for `all`: TRL's interpreter")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.step in ("prepare", "all"):
        prepare(out)
    if args.step == "trl":
        run_trl(out)
    if args.step == "all":
        subprocess.run([args.trl_python, __file__, "trl", "--out", str(out)], check=True)
    if args.step in ("compare", "all"):
        compare(out)


if __name__ == "__main__":
    main()
