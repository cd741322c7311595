"""Which strategy a run uses, and the combinations refused before any model loads (StageCLI calls
`strategy_refusals` after parsing, before the classes are built).

Refused, with the reason each names:
- a bitsandbytes-quantised base (int8, nf4, fp4) under FSDP or DeepSpeed: FSDP shards float tensors only (int8 never;
  4-bit only with `bnb_4bit_quant_storage` set to a float dtype, which ModelSpec does not set; bitsandbytes
  docs "FSDP-QLoRA"); ZeRO-3 and bitsandbytes are incompatible (DeepSpeed issue 5819) and our quantised load pins a
  device_map, which ZeRO-3 refuses; ZeRO-2 casts the module to the training dtype, which a quantised model refuses.
  DDP runs them: each process holds the whole quantised base.
- ppo and rs under a strategy that shards the weights (FSDP, ZeRO-3): sampling stops when this rank's rows have all
  finished, so ranks run different numbers of forwards, and each forward gathers weights from every rank: they
  would wait on each other forever. DDP and ZeRO-2 hold whole weights and sample as one process does.
- dpo `reference: precomputed` under FSDP or ZeRO-3: its pass runs before the first step, outside the sharded
  module's forward, where the weights are not gathered.
LoRA is not refused: Lightning's FSDP sets use_orig_params, so frozen base weights and trainable adapters share units.
"""

from __future__ import annotations

import importlib

from jsonargparse import Namespace

SAMPLING_STAGES = ("ppo", "rs")


def strategy_kind(strategy) -> tuple[str, int]:
    """("ddp" | "fsdp" | "deepspeed" | "other", ZeRO stage or 0) of trainer.strategy as parsed: a registered name
    ("fsdp", "deepspeed_stage_3_offload", ...) or a class_path with init_args (subclasses count as their base)."""
    if isinstance(strategy, str):
        name = strategy.lower()
        if name.startswith("fsdp"):
            return "fsdp", 0
        if name.startswith("deepspeed"):
            digits = [c for c in name.removeprefix("deepspeed_stage_")[:1] if c.isdigit()]
            return "deepspeed", int(digits[0]) if digits else 2
        return ("ddp" if name.startswith("ddp") else "other"), 0
    class_path = strategy.get("class_path") if isinstance(strategy, (dict, Namespace)) else None
    if not class_path:
        return "other", 0
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    init_args = strategy.get("init_args") or {}
    if issubclass(cls, FSDPStrategy):
        return "fsdp", 0
    if issubclass(cls, DeepSpeedStrategy):
        return "deepspeed", int(init_args.get("stage") or 2)
    return ("ddp" if issubclass(cls, DDPStrategy) else "other"), 0


def quantised_specs(model, key: str = "model") -> list[tuple[str, str]]:
    """(dotted key, quantization) of every ModelSpec in the model config that loads a bitsandbytes-quantised base."""
    if isinstance(model, Namespace):
        model = model.as_dict()
    if isinstance(model, dict):
        if "path" in model and model.get("quantization") not in (None, "none"):
            return [(key, model["quantization"])]
        return [found for k, v in model.items() for found in quantised_specs(v, f"{key}.{k}")]
    if isinstance(model, list):
        return [found for i, v in enumerate(model) for found in quantised_specs(v, f"{key}[{i}]")]
    return []


def strategy_refusals(stage: str, config: Namespace) -> list[str]:
    """Reasons this subcommand's config (trainer + model) cannot run; [] when it can."""
    kind, zero = strategy_kind(config.trainer.get("strategy"))
    if kind not in ("fsdp", "deepspeed"):
        return []
    name = "FSDP" if kind == "fsdp" else f"DeepSpeed ZeRO-{zero}"
    sharded = kind == "fsdp" or zero == 3
    refusals = [f"model.{key[6:]}.quantization={q}: {name} cannot hold a bitsandbytes-quantised base "
                + ("(FSDP shards float tensors only)" if kind == "fsdp" else
                   "(ZeRO-3 partitions and ZeRO-2 casts the weights bitsandbytes keeps quantised)")
                + "; use DDP (configs/strategies/ddp.yaml), or drop the quantization"
                for key, q in quantised_specs(config.get("model"))]
    if sharded and stage in SAMPLING_STAGES:
        refusals.append(f"rlhf {stage} samples under {name}, which shards the weights: each rank stops sampling "
                        "when its own rows finish, so ranks would wait on each other's weight gathers forever; use "
                        "DDP or DeepSpeed ZeRO-2 (whole weights on every rank)")
    if sharded and stage == "dpo" and config.model.get("reference") == "precomputed":
        refusals.append(f"model.reference=precomputed under {name}: its pass runs before training, outside the "
                        "sharded forward; use reference copy or adapter, or DDP / ZeRO-2")
    return refusals
