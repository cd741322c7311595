"""Sharding policies for `configs/strategies/*.yaml`: which submodules FSDP wraps (and checkpoints) as units.
Named in YAML by import path, they pick a model's decoder blocks by class name, so one overlay fits any
Hugging Face decoder (LlamaDecoderLayer, Qwen2DecoderLayer, MistralDecoderLayer, ...) without naming its classes."""

from __future__ import annotations

import torch


def decoder_layers(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
    """FSDP auto-wrap policy (torch.distributed.fsdp's `(module, recurse, nonwrapped_numel) -> bool`): descend
    everywhere (recurse), wrap each module whose class name ends in "DecoderLayer" as its own FSDP unit; the
    root FSDP unit takes what is left (embeddings, final norm, heads)."""
    return recurse or is_decoder_layer(module)


def is_decoder_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("DecoderLayer")
