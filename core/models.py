"""ModelSpec / LoraSpec -> loaded Hugging Face models. The only file that imports transformers, peft and
bitsandbytes model classes."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from core.outputs import write_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the 8-bit CPU path warns on every call


@dataclass
class LoraSpec:
    """LoRA adapter (Hu et al. 2021, arXiv 2106.09685) through peft.

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear" for every linear layer but the head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelSpec:
    """Which pretrained model to load and how.

    Args:
        path: Hugging Face hub id or local directory (a saved model, or the folder holding `gguf_file`).
        revision: hub revision (branch, tag or commit); ignored for local directories.
        gguf_file: file name of a GGUF checkpoint inside `path`; it is dequantised on load.
        dtype: weight dtype: float32 (CPU), bfloat16 or float16 (GPU), or auto (as saved).
        quantization: bitsandbytes weight quantisation: none, int8 (LLM.int8), nf4 or fp4 (QLoRA).
        lora: train a LoRA adapter instead of the full weights (required for quantised training).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run modelling code shipped with the checkpoint. Off unless you trust it.
        attn_implementation: eager, sdpa, flash_attention_2 or flex_attention (packed and prompt-shared rows
            as a BlockMask; forward-only on CPU, trains on GPUs); None lets transformers choose.
        train_top_layers: full-weight training of only the top N transformer blocks and what follows them
            (final norm, score head, an untied vocabulary head); the embeddings and lower blocks stay frozen,
            so backward stops at block L - N (faster, leaner). None trains every weight. Not with lora.
    """

    path: str
    revision: str | None = None
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    quantization: Literal["none", "int8", "nf4", "fp4"] = "none"
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    train_top_layers: int | None = None

    def __post_init__(self):
        if self.train_top_layers is not None and (self.train_top_layers < 1 or self.lora is not None):
            raise ValueError(f"train_top_layers must be a positive number of blocks, without lora; got "
                             f"{self.train_top_layers} with lora={self.lora}")


def as_spec(spec: ModelSpec | dict | str) -> ModelSpec:
    """LightningCLI hands dataclass arguments over as objects, checkpoints as dicts: accept both."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(path=spec)
    spec = dict(spec)
    if isinstance(spec.get("lora"), dict):
        spec["lora"] = LoraSpec(**spec["lora"])
    return ModelSpec(**spec)


class ModelPathError(FileNotFoundError):
    """A local model path (./x, /x, ~/x, a/b/c, or a/b under an existing folder a) with no folder there."""


def check_model_path(spec: ModelSpec) -> ModelSpec:
    """Stop at a missing local folder before transformers takes it for a hub repo id (and says so)."""
    path, sep = spec.path, os.sep
    local = (path.startswith((".", sep, "~")) or path.count(sep) > 1
             or (sep in path and Path(path.split(sep)[0]).is_dir()))
    if local and not Path(path).expanduser().is_dir():
        what = "not a folder" if Path(path).expanduser().exists() else "no such model folder"
        raise ModelPathError(f"{path}: {what} (a local path, so not looked up on the Hugging Face hub)")
    return spec


def load_tokenizer(spec: ModelSpec | str, padding_side: str = "right"):
    """Tokenizer of a model; pad falls back to EOS (then masks, not token ids, tell padding apart)."""
    from transformers import AutoTokenizer

    spec = check_model_path(as_spec(spec))
    tok = AutoTokenizer.from_pretrained(
        spec.path, revision=spec.revision, gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code
    )
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {spec.path} has no EOS token; completions must end with one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


PAD_TOKEN = "<|pad|>"  # the pad a saved reward model gets when its tokenizer's pad could end a text


def text_token_ids(tok) -> set[int]:
    """Special token ids a scored text can hold, so can end with: BOS, EOS and every token the tokenizer's chat
    template writes around a turn (an end-of-turn token such as <|im_end|> or <|eot_id|>)."""
    ids = {tok.bos_token_id, tok.eos_token_id}
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                           tokenize=False)
            ids |= set(tok(text, add_special_tokens=False)["input_ids"]) & set(tok.all_special_ids)
        except Exception as err:  # a template that refuses this conversation: BOS and EOS only
            log.debug(f"chat template not rendered for the pad check: {err!r}")
    return ids - {None}


def distinct_pad(tok) -> bool:
    """Give `tok` a pad token no text can end with (True when it changed). transformers' sequence classifiers
    (AutoModelForSequenceClassification, text-classification pipelines, TRL) find a row's last token as the
    rightmost token that is not config.pad_token_id: with pad == EOS or an end-of-turn token, a text ending in
    it would be scored one token early. A tokenizer whose pad is such a token gets a new special token
    PAD_TOKEN (the model's embeddings then need one more row: load_sequence_classifier(vocab_size=len(tok)))."""
    if tok.pad_token_id is not None and tok.pad_token_id not in text_token_ids(tok):
        return False
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def _load_kwargs(spec: ModelSpec, device: str | torch.device | None) -> dict:
    check_model_path(spec)
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, gguf_file=spec.gguf_file)
    if spec.dtype != "auto":
        kwargs["dtype"] = DTYPES[spec.dtype]
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig

        compute = DTYPES.get(spec.dtype, torch.float32)
        if spec.quantization == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=spec.quantization, bnb_4bit_compute_dtype=compute
            )
        # bitsandbytes quantises on the device the weights land on: load straight onto it
        kwargs["device_map"] = {"": str(device or "cpu")}
    return kwargs


def _finish(model, spec: ModelSpec, task_type: str):
    if spec.quantization != "none" and spec.lora is None:
        raise ValueError(f"quantization={spec.quantization} trains only with a LoRA adapter: set lora")
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if spec.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
        config = LoraConfig(
            task_type=task_type,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
        )
        model = get_peft_model(model, config)
    if spec.train_top_layers is not None:
        train_top_layers(model, spec.train_top_layers)
    return model


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ModuleList (config.num_hidden_layers long where the config says)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    n = getattr(model.config, "num_hidden_layers", None)
    matching = [m for m in lists if len(m) == n] or lists
    if not matching:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(matching, key=len)


def train_top_layers(model, n: int) -> None:
    """Freeze everything but the top n blocks and the modules after them (norm, heads); embeddings (token,
    position, and a vocabulary head tied to them) stay frozen."""
    blocks = decoder_blocks(model)
    if n > len(blocks):
        raise ValueError(f"train_top_layers={n} but the model has {len(blocks)} blocks")
    in_blocks = {id(p) for p in blocks.parameters()}
    top = {id(p) for b in list(blocks)[len(blocks) - n :] for p in b.parameters()}
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in top or (id(p) not in in_blocks and id(p) not in embedding))


def load_causal_lm(spec: ModelSpec | dict | str, device: str | torch.device | None = None, trainable: bool = True):
    """Causal LM from a spec. Frozen (trainable=False) models come back in eval mode without grads."""
    from transformers import AutoModelForCausalLM

    spec = as_spec(spec)
    model = AutoModelForCausalLM.from_pretrained(spec.path, **_load_kwargs(spec, device))
    if not trainable:
        return freeze(model)
    return _finish(model, spec, "CAUSAL_LM").train()


def load_saved_causal_lm(path: str | os.PathLike, dtype: str = "float32", device: str | torch.device | None = None):
    """A saved folder for inference, frozen: a full (merged) model, or a LoRA adapter folder (adapter_config.json)
    put on the base model it names, through peft."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return load_causal_lm(ModelSpec(path=str(path), dtype=dtype), device, trainable=False)
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    base = load_causal_lm(ModelSpec(path=base_path, dtype=dtype), device, trainable=False)
    return freeze(PeftModel.from_pretrained(base, str(folder)))


def load_sequence_classifier(
    spec: ModelSpec | dict | str, pad_token_id: int, device: str | torch.device | None = None, trainable: bool = True,
    vocab_size: int | None = None,
):
    """Scalar-head model (num_labels=1): a causal LM gets its vocabulary head replaced by a new score head;
    a sequence-classification checkpoint (a reward model, an encoder) loads as it is. vocab_size: the tokenizer's
    length; token embeddings with fewer rows grow to it (a pad token added by distinct_pad), before any adapter."""
    from transformers import AutoModelForSequenceClassification

    spec = as_spec(spec)
    model = AutoModelForSequenceClassification.from_pretrained(spec.path, num_labels=1, **_load_kwargs(spec, device))
    embeddings = model.get_input_embeddings()
    if vocab_size is not None and embeddings is not None and vocab_size > embeddings.num_embeddings:
        old = embeddings.num_embeddings
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        with torch.no_grad():  # the new rows (padding: always masked) get the mean embedding, no random draw
            weight = model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(0, keepdim=True)
    model.config.pad_token_id = pad_token_id  # sequence classification finds the last token through it
    if not trainable:
        return freeze(model)
    return _finish(model, spec, "SEQ_CLS").train()


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def unwrap_peft(model):
    """The model inside a peft wrapper (its LoRA layers stay active in place), else the model itself. A model
    with a transformers-loaded adapter has a peft_config but no wrapper: it is returned as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_hf(model, tokenizer, out_dir: str | os.PathLike, merge_lora: bool = True, overwrite: bool = False,
            info: dict | None = None, state_dict: dict | None = None) -> Path:
    """Save in Hugging Face format (safetensors) so `from_pretrained(out_dir)` loads it, with our marker file
    (outputs.py: `info` goes into it). Written to a sibling temp dir first and swapped in, so an existing output
    is never half-overwritten; a folder we did not write is replaced only with overwrite. `state_dict`: a LoRA
    model's gathered weights by named_parameters names (a sharded model), saved as its adapter.

    A LoRA model is merged into its base (merge_lora) or saved as an adapter; a quantised base cannot be
    merged losslessly and is always saved as an adapter. An adapter records its base as an absolute path
    when the base is a local folder, so it loads from any working directory."""
    to_save = model
    if is_peft(model) and merge_lora:
        if (getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or _quantised(model)):
            log.warning("quantised base: saving the LoRA adapter only (merge it into a full-precision base)")
        else:
            to_save = _untie_output(copy.deepcopy(model)).merge_and_unload()
    if is_peft(to_save):
        for config in to_save.peft_config.values():
            base = config.base_model_name_or_path
            if base and Path(base).expanduser().is_dir():
                config.base_model_name_or_path = str(Path(base).expanduser().resolve())

    def write(tmp: Path) -> None:
        if state_dict is not None and is_peft(to_save):
            save_gathered_adapter(to_save, state_dict, tmp)
        else:
            to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_dir(out_dir, write, info or {}, overwrite)


def save_gathered_adapter(model, named: dict, out_dir: Path) -> None:
    """A LoRA adapter from weights gathered out of a sharded module (FSDP): peft picks the adapter's entries by
    the module names it sees, which carry the wrapper modules' names, so the entries are taken with those names and
    saved without them, as peft's own save_pretrained writes an adapter (adapter_model.safetensors + config)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from core.optim import unwrapped_name

    adapter = get_peft_model_state_dict(model, state_dict=named)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({unwrapped_name(k): v.detach().cpu().contiguous() for k, v in adapter.items()},
              str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(out_dir))


def _untie_output(peft_model):
    """A LoRA on a tied lm_head would also be merged into the input embeddings: give the head its own copy."""
    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    if head is None or not getattr(base.config, "tie_word_embeddings", False) or not hasattr(head, "base_layer"):
        return peft_model
    head.base_layer.weight = torch.nn.Parameter(head.base_layer.weight.detach().clone())
    base.config.tie_word_embeddings = False
    return peft_model


def _quantised(model) -> bool:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return quant is not None and str(method) not in ("gguf", "QuantizationMethod.GGUF")  # GGUF loads dequantised


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: list[str],
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    seed: int = 0,
    intermediate_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE on texts and save it with a randomly initialised Llama: a base model for
    tests and the quickstart that needs no download. Returns out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_position_embeddings,
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return save_hf(model, tok, out_dir, overwrite=overwrite, info={"model": "tiny test model"})


def convert_gguf(path: str, gguf_file: str, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors HF directory (loads in well under a second after).
    The object `from_pretrained(gguf_file=...)` returns cannot `save_pretrained` itself: rebuild it from its
    config and load the state dict into the fresh model first."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec(path=path, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantised: the saved folder holds plain fp32 weights
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    return save_hf(fresh, load_tokenizer(spec), out_dir, overwrite=overwrite, info={"converted_from": gguf_file})
