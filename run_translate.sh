#!/usr/bin/env bash
# Translate task data for FLARE, in the original's two directions per target language:
#   1. source -> target (train/val/test: translate-train data and FLARE's target side)
#   2. target -> source (the target test set into English: translate-test and FLARE's English test side)
# Writes translations/{task}/translate-{lang}-{model}/..., where train_flare.sh reads.
# Override with environment variables, e.g.:
#   TASKS="nusax" TARGET_LANGS="jav sun" MODEL=reference DATA_DIR=data bash run_translate.sh
set -euo pipefail
cd "$(dirname "$0")"

TASKS="${TASKS:-xnli}"
SOURCE_LANG="${SOURCE_LANG:-en}"
TARGET_LANGS="${TARGET_LANGS:-es}"
MODEL="${MODEL:-nllb-3.3b}"          # the paper's training data came from NLLB 3.3B (the original script said 600m)
BATCH_SIZE="${BATCH_SIZE:-128}"
OUTPUT_DIR="${OUTPUT_DIR:-translations}"
DATA_DIR="${DATA_DIR:-}"
BF16="${BF16:-1}"                    # bf16 weights on a GPU (ignored on a CPU)

for task in $TASKS; do
  case "$task" in
    tydiqa) max_len=768 ;;
    *)      max_len=256 ;;
  esac
  fwd_splits=()                       # default: every split the task table lists for translation
  [ -n "${SPLITS:-}" ] && fwd_splits=(--splits $SPLITS)
  for tgt in $TARGET_LANGS; do
    common=(--task "$task" --model "$MODEL" --batch_size "$BATCH_SIZE" --max_length "$max_len" --output_dir "$OUTPUT_DIR")
    [ -n "$DATA_DIR" ] && common+=(--data_dir "$DATA_DIR")
    [ "$BF16" = "1" ] && [ "$MODEL" != "reference" ] && common+=(--bf16)
    # 1. English data into the target language
    python run_translate.py "${common[@]}" --source_lang "$SOURCE_LANG" --target_lang "$tgt" ${fwd_splits[@]+"${fwd_splits[@]}"} "$@"
    # 2. the target test set into English
    python run_translate.py "${common[@]}" --source_lang "$tgt" --target_lang "$SOURCE_LANG" --splits test "$@"
  done
done
