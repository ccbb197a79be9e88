#!/usr/bin/env bash
# Stage 2 of FLARE: one driver for every mode of run.py.
# Defaults = the original's configuration: gemma2-9b, xnli, en -> es, FLARE add_relu, NLLB 3.3B translations,
# seed 100, 3 epochs, r 8, alpha 16, bf16. Unlike the original script it passes --load_ckpt and reads the
# translations where run_translate.sh writes them. Run, in order, on a GPU node:
#   bash train_task_ft.sh && bash run_translate.sh && bash train_flare.sh
# Override with environment variables, e.g.:
#   MODE=flare-mt FUSION_FN=add MT_MODEL=nllb-600m bash train_flare.sh
#   TASK=nusax TGT=jav PLM=xlmr-large MODE=lora bash train_flare.sh
# MODE: flare | flare-mt | lora (translate-train LoRA) | xmixup (X-Mixup) | input-fusion | zero-shot | translate-test
# Extra flags for run.py go after the script name:  bash train_flare.sh --max_train_samples 1000
set -euo pipefail
cd "$(dirname "$0")"

TASK="${TASK:-xnli}"
PLM="${PLM:-gemma2-9b}"
SRC="${SRC:-en}"
TGT="${TGT:-es}"
MODE="${MODE:-flare}"
FUSION_FN="${FUSION_FN:-add_relu}"
MT="${MT:-nllb-3.3b}"                 # translation model whose output run_translate.sh wrote
MT_MODEL="${MT_MODEL:-nllb-3.3b}"     # FLARE MT: the NLLB encoder whose states are fused
SEED="${SEED:-100}"
EPOCHS="${EPOCHS:-3}"
LORA_R="${LORA_R:-8}"
LORA_ALPHA="${LORA_ALPHA:-16}"
LR="${LR:-2e-5}"
BATCH_SIZE="${BATCH_SIZE:-32}"
OUTPUT_DIR="${OUTPUT_DIR:-checkpoints}"
TRANSLATIONS="${TRANSLATIONS:-translations}"
DATA_DIR="${DATA_DIR:-}"
BF16="${BF16:-1}"                     # 0 for fp32 (e.g. on a CPU without bf16)

PLM_NAME="$PLM"
[ -d "$PLM" ] && PLM_NAME="$(basename "$(cd "$PLM" && pwd)")"
LOAD_CKPT="${LOAD_CKPT:-$OUTPUT_DIR/$TASK-$SRC-$PLM_NAME-$SEED}"
FORWARD="$TRANSLATIONS/$TASK/translate-$TGT-$MT"     # English -> target (training data)
BACKWARD="$TRANSLATIONS/$TASK/translate-$SRC-$MT"    # target test -> English

args=(--task "$TASK" --plm "$PLM" --source_lang "$SRC" --target_lang "$TGT" --seed "$SEED" --epochs "$EPOCHS"
      --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lr "$LR" --batch_size "$BATCH_SIZE"
      --output_dir "$OUTPUT_DIR" --load_ckpt "$LOAD_CKPT")
train=(--adapter lora --translate-train --path_mt "$FORWARD")
case "$MODE" in
  flare)          args+=("${train[@]}" --fusion_fn "$FUSION_FN") ;;
  flare-mt)       args+=("${train[@]}" --fusion_fn "$FUSION_FN" --fuse_mt --mt_model "$MT_MODEL") ;;
  lora)           args+=("${train[@]}") ;;
  xmixup)         args+=("${train[@]}" --xmixup) ;;
  input-fusion)   args+=("${train[@]}" --input_fusion) ;;
  zero-shot)      args+=(--eval_zs --eval_only) ;;
  translate-test) args+=(--translate-test --path_mt "$BACKWARD") ;;
  *) echo "train_flare.sh: unknown MODE=$MODE (flare, flare-mt, lora, xmixup, input-fusion, zero-shot, translate-test)" >&2
     exit 2 ;;
esac
[ "$BF16" = "1" ] && args+=(--bf16)
[ -n "$DATA_DIR" ] && args+=(--data_dir "$DATA_DIR")

echo "run.py ${args[*]} $*"
exec python run.py "${args[@]}" "$@"
