#!/usr/bin/env bash
# Stage 1 of FLARE: LoRA fine-tuning on English task data.
# Defaults = the original's configuration (gemma2-9b, xnli, en, seed 100, 3 epochs, r 8, alpha 16, bf16, 4-bit).
# Override with environment variables, e.g.:  TASK=nusax PLM=xlmr-large bash train_task_ft.sh
# Extra flags for run_task_ft.py go after the script name:  bash train_task_ft.sh --max_train_samples 1000
set -euo pipefail
cd "$(dirname "$0")"

TASK="${TASK:-xnli}"
PLM="${PLM:-gemma2-9b}"
LANG_="${LANG_CODE:-en}"
SEED="${SEED:-100}"
EPOCHS="${EPOCHS:-3}"
LORA_R="${LORA_R:-8}"
LORA_ALPHA="${LORA_ALPHA:-16}"
LR="${LR:-2e-5}"
BATCH_SIZE="${BATCH_SIZE:-32}"
OUTPUT_DIR="${OUTPUT_DIR:-checkpoints}"
BF16="${BF16:-1}"          # 0 to train in fp32 (e.g. on a CPU without bf16)
DATA_DIR="${DATA_DIR:-}"   # e.g. data to use the shipped local files instead of the hub

args=(--task "$TASK" --plm "$PLM" --lang "$LANG_" --seed "$SEED" --epochs "$EPOCHS" --adapter lora
      --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lr "$LR" --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR")
[ "$BF16" = "1" ] && args+=(--bf16)
[ -n "$DATA_DIR" ] && args+=(--data_dir "$DATA_DIR")

echo "run_task_ft.py ${args[*]} $*"
exec python run_task_ft.py "${args[@]}" "$@"
