"""`rlhf reward <fit|validate|test|predict>`: reward model on preference pairs or K-wise rankings.

`rlhf reward fit ... --members N --model.save_dir DIR` trains an ensemble in one command: N normal fits, one
after another in this process, member i with seed (seed_everything + i) saved to DIR/member_i and logged under
its own folder (<logger name>/member_i/version_K). A member whose folder holds a finished export is skipped, so
the same command resumes an interrupted ensemble. DIR then stands for its members in a RewardSpec
(`models: [{path: DIR}]`, `ensemble: mean`). With `--data.bootstrap true` each member draws its own resample
(bootstrap_seed defaults to the run's seed).

With `--members N`, a `--model.backbone.path` that is itself an ensemble (a folder of member_0 .. member_N-1, as
`--members` writes) continues it: member i starts from member_i, its scalar head included, so a round of fresh
comparisons fine-tunes the previous ensemble instead of drawing a new one (a member's errors then change less
from round to round).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import sys
from pathlib import Path

from recipes.common import run_cli

PROG = "rlhf reward"
LINKS = [("model.backbone.path", "data.tokenizer")]


def main(args: list[str] | None = None):
    from datamodules.preference import PreferenceDataModule
    from modules.reward import RewardModule

    argv = sys.argv[1:] if args is None else list(args)
    if not any(a == "--members" or a.startswith("--members=") for a in argv):
        return run_cli(RewardModule, PreferenceDataModule, "reward", LINKS, args)
    members, rest = pop_members(argv)
    return fit_members(members, rest)


def pop_members(argv: list[str]) -> tuple[int, list[str]]:
    """`--members N` / `--members=N` taken out of argv -> (N, the rest); a bad N or a subcommand other than fit:
    SystemExit with one line, before any parsing or model loading."""
    rest, values, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--members":
            given = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            values.append(argv[i + 1] if given else None)
            i += 2 if given else 1
            continue
        if arg.startswith("--members="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    value = values[-1]
    try:
        members = int(value)
    except (TypeError, ValueError):
        members = 0
    if members < 2:
        raise SystemExit(f"{PROG}: --members takes the number of ensemble members, a whole number >= 2; got "
                         f"{'nothing' if value is None else repr(value)}")
    if not rest or rest[0] != "fit":
        got = f"`{PROG} {rest[0]}`" if rest and not rest[0].startswith("-") else "no subcommand"
        raise SystemExit(f"{PROG}: --members trains an ensemble and goes with `{PROG} fit`, not {got}; validate, test "
                         "or predict one member at a time (--model.backbone.path DIR/member_i)")
    return members, rest


def parsed_config(args: list[str]) -> dict:
    """The fit config `args` give, values as given (`--print_config`: parsed by the recipe, nothing built)."""
    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*args, "--print_config"])
        except SystemExit as err:
            if err.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def fit_members(members: int, args: list[str]) -> list[tuple[str, Path]]:
    """`rlhf reward fit` N times, member i with seed base + i, save_dir DIR/member_i and its own log folder;
    a member whose save_dir holds a finished export is skipped. -> (trained | skipped, save_dir) per member."""
    import torch
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from core.outputs import is_ours

    if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=") for a in args):
        return main(args)  # what one member's run would be: help or its config
    config = parsed_config(args)
    base, save_dir, root = (config.get("seed_everything"), config["model"].get("save_dir"),
                            config["trainer"].get("default_root_dir"))
    if not save_dir:
        raise SystemExit(f"{PROG}: --members needs --model.save_dir DIR: member i is saved to DIR/member_i")
    if isinstance(base, bool) or not isinstance(base, int):
        raise SystemExit(f"{PROG}: --members gives member i the seed seed_everything + i: set --seed_everything to a "
                         f"whole number, got {base!r}")
    if config.get("ckpt_path"):
        raise SystemExit(f"{PROG}: --members starts each member's run afresh and cannot take --ckpt_path; resume one "
                         "member with `rlhf reward fit` and that member's --model.save_dir, --seed_everything and "
                         "--ckpt_path")
    parent = Path(save_dir).expanduser()
    parent = parent if parent.is_absolute() else Path(root or os.getcwd()).absolute() / parent  # as the module does
    if (parent / "config.json").exists():
        raise SystemExit(f"{PROG}: --model.save_dir {save_dir} holds one model: give the ensemble a folder of its own")

    done = []
    for i in range(members):
        out = parent / f"member_{i}"
        if is_ours(out):
            done.append(("skipped", out))
            continue
        if rank_zero_only.rank == 0:
            print(f"{PROG}: member {i + 1} of {members} (seed {base + i}) -> {out}")
        cli = main([*args, *member_args(config, i, out, base + i, root), *member_start(config, i, members)])
        del cli  # the member's trainer and model: freed before the next one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        done.append(("trained", out))
    if rank_zero_only.rank == 0:
        for i, (status, out) in enumerate(done):
            print(f"{PROG}: member_{i} {status}{' (a finished export is there)' if status == 'skipped' else ''}: {out}")
    return done


def member_start(config: dict, i: int, members: int) -> list[str]:
    """`--model.backbone.path=PATH/member_i` when the backbone PATH is an ensemble (a folder of member folders,
    no config.json of its own): member i continues member i. It must have at least `members` members, else
    SystemExit naming the missing one. A single model: no override (every member starts from it)."""
    backbone = config["model"].get("backbone")
    path = backbone.get("path") if isinstance(backbone, dict) else backbone
    if not isinstance(path, str) or not path:
        return []
    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / "config.json").exists() or not (folder / "member_0").is_dir():
        return []
    missing = [f"member_{k}" for k in range(members) if not (folder / f"member_{k}" / "config.json").exists()]
    if missing:
        raise SystemExit(f"{PROG}: --model.backbone.path {path} is an ensemble without {', '.join(missing)}: "
                         f"--members {members} continues member i from member_i, so it needs {members} of them")
    return [f"--model.backbone.path={folder / f'member_{i}'}"]


def clear_members(parent: Path) -> None:
    """Remove the member folders of an ensemble that lightning-rlhf wrote (marked), so `--members` trains them
    afresh instead of skipping them; anything else in `parent` is left alone."""
    from core.outputs import is_ours

    for member in Path(parent).glob("member_*"):
        if is_ours(member):
            shutil.rmtree(member)


def member_args(config: dict, i: int, out: Path, seed: int, root: str | None) -> list[str]:
    """Overrides of member i, after the user's arguments (the last value wins): its seed and save_dir, and its
    own log and checkpoint folder, so no member resumes, overwrites or is taken for another's run."""
    name = f"member_{i}"
    extra = [f"--seed_everything={seed}", f"--model.save_dir={out}"]
    logger = config["trainer"].get("logger")
    if isinstance(logger, dict) and "name" in (logger.get("init_args") or {}):  # CSV / TensorBoard: <name>/member_i
        extra.append(f"--trainer.logger.init_args.name={os.path.join(logger['init_args']['name'] or '', name)}")
    else:  # logger true / false / a list: each member gets a run root of its own
        extra.append(f"--trainer.default_root_dir={Path(root or os.getcwd()) / name}")
    dirpath = config.get("checkpoint", {}).get("dirpath")
    if dirpath:
        extra.append(f"--checkpoint.dirpath={Path(dirpath) / name}")
    return extra


if __name__ == "__main__":
    main(sys.argv[1:])
