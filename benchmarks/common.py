"""The standard benchmark workload shared by benchmarks/*.py.

First N pairs of ../shared/data/hh-rlhf-harmless/train.jsonl; a byte-level BPE (vocab 8192) trained on them;
a randomly initialised Llama (hidden 384, 6 layers, 6 heads, intermediate 1024), fp32, 2 threads.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HH_TRAIN = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"


def hh_pairs(n: int) -> list[dict]:
    """The first n HH-RLHF rows as {prompt, chosen, rejected} with the shared prompt split off by turns."""
    from datamodules.formats import split_hh

    rows = []
    with open(HH_TRAIN) as f:
        for i, line in enumerate(f):
            if len(rows) == n:
                break
            row = json.loads(line)
            prompt, chosen = split_hh(row["chosen"], f"{HH_TRAIN}:{i + 1}", allow_empty=True)
            prompt_r, rejected = split_hh(row["rejected"], f"{HH_TRAIN}:{i + 1}", allow_empty=True)
            if prompt == prompt_r and chosen.strip() and rejected.strip() and chosen != rejected:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_standard_model(out: Path, texts: list[str]) -> Path:
    from modules.models import build_tiny_model

    return build_tiny_model(
        out, texts, vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024,
        max_position_embeddings=1024, seed=0,
    )


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def machine() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "transformers": version("transformers"),
        "trl": version("trl"),
    }


def report(name: str, result: dict) -> None:
    print(json.dumps({"benchmark": name, **result, **machine()}))
