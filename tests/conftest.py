"""Test-wide setup: never reach the network, keep the HF cache in a temporary folder, share tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before transformers/datasets/huggingface_hub are imported by any test module: these libraries read the
# variables at import time. Without them a hub id retries for ~23 s before failing.
_HF_HOME = tempfile.mkdtemp(prefix="flare-test-hf-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HOME=_HF_HOME,
    FLARE_CACHE=tempfile.mkdtemp(prefix="flare-test-cache-"),  # the converted me5-small model
    HF_HUB_DISABLE_TELEMETRY="1",
    WANDB_DISABLED="true",
    TOKENIZERS_PARALLELISM="false",
)

# Under pytest-xdist (`-n 2`, the README's test command) the workers share the CPU: each gets its share of the cores
# (set before torch is imported; subprocesses inherit it), or two 2-thread torch pools on 2 cores thrash.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny random llama / gemma2 / xlm-roberta / bert / nllb models, and the newer families (qwen3, gemma3_text,
    phi3, mistral, xlm-roberta-xl), with working tokenizers (built once; the tokenizers are shared)."""
    from flare.tiny_models import EXTRA_FAMILIES, FAMILIES, write_tiny_models

    out = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(out, data_dir=DATA, families=FAMILIES + EXTRA_FAMILIES)
    return out
