#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): stage 1 and FLARE on random models shaped like Llama 3.1 8B (4-bit, bf16)
# and XLM-R large with --epochs 1, step_cost's LoRA vs FLARE tokens/s and peak memory, torchrun when 2 GPUs are
# visible. Writes bench/results/gpu_check.json. `bash bench/gpu_check.sh --device cpu` runs it on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_check.py "$@"
