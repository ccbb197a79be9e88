"""Run one Evaluator on a tiny model and write what this process predicted (a helper of test_distributed.py).

``python tests/shard_eval_worker.py MODEL_DIR TASK OUT_JSON`` in one process, or under ``torchrun`` (gloo): then
``OUT_JSON`` gets a ``.rankN`` suffix per rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flare.config import resolve_model
from flare.data import load_task
from flare.evaluation import Evaluator
from flare.models.loading import load_model, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"


def main(model_dir: str, task: str, out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        out = f"{out}.rank{dist.get_rank()}"
    torch.manual_seed(0)  # the same random task head in every process
    spec = resolve_model(model_dir)
    tok = load_tokenizer(spec)
    model = load_model(spec, task, quantize="none", device="cpu", bf16=False)
    lang, n = {"nusax": ("jav", 9), "tydiqa": ("en", 7)}[task]
    examples = load_task(task, lang, "test", DATA).select(range(n))
    ev = Evaluator(task, spec, tok, examples, 96, batch_size=2, doc_stride=32)
    predictions = ev.predict(model)
    Path(out).write_text(json.dumps({"predictions": predictions, "metrics": ev.score(predictions),
                                     "outputs": ev.outputs, "batches_run": ev.batches_run,
                                     "n_batches": ev._n_batches()}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
