#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): stage 1 and FLARE with --epochs 1 on random models shaped like Llama 3.1 8B
# (4-bit, bf16, generation, gradient checkpointing), Gemma 2 9B (4-bit) and XLM-R large (no precision flag = TF32,
# --bf16, --fp16), TyDiQA stage 1 and zero-shot, step_cost's LoRA vs FLARE tokens/s and peak memory, torchrun for
# both stages when 2 GPUs are visible. Writes bench/results/gpu_check.json; `--parts PREFIX...` re-runs some parts.
# `bash bench/gpu_check.sh --device cpu` runs it on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_check.py "$@"
