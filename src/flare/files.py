"""Run files, standard library only (no torch, no pandas): atomic writers (a reader never sees half a file) and the
reader of a run directory's ``run_config.json``."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, data) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


ADAPTER_FILE = "adapter_model.safetensors"  # a run directory's adapter (+ head) weights
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it LAST into a checkpoint-N folder
CHECKPOINT_NEEDS = ("optimizer.pt", "scheduler.pt")  # what a resume loads besides the weights
CHECKPOINT_WEIGHTS = (ADAPTER_FILE, "model.safetensors")
RUNTIME_FILE = "flare_runtime.json"  # in a checkpoint: training seconds of every attempt up to it (written before
# trainer_state.json, so a complete checkpoint has it)


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is truncated or corrupt (its header and size disagree), or None if it is whole. Read with
    the standard library (an 8-byte little-endian header size, a JSON header of tensor offsets, the data), so a flag
    check never waits for torch."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"the header describes {8 + n + max(ends, default=0)} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # JSONDecodeError is a ValueError
        return str(e)
    return None


RUN_RESULTS = ("results_*.json", "predictions_*.jsonl", "run_config.json")  # what a study commits of a run


def copy_run_results(run_dir: Path, dest: Path, patterns: tuple[str, ...] = RUN_RESULTS) -> None:
    """Copy a run's results, predictions and configuration (no checkpoints) into ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for f in run_dir.glob(pattern):
            shutil.copy2(f, dest / f.name)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a (whole) safetensors file, read from its header with the standard library."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def adapter_layer_count(run_dir: Path, layers: str) -> int:
    """How many transformer layers a run's adapter covers: the highest ``{layers}.N.`` index in its tensor names
    + 1 (LoRA sits in every layer), without loading a model; 0 if none match."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layers)}\.(\d+)\.")
    found = [int(m.group(1)) for k in safetensors_keys(run_dir / ADAPTER_FILE) if (m := pattern.search(k))]
    return max(found) + 1 if found else 0


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` (a Trainer ``checkpoint-N`` folder) cannot be resumed from, or None if it is complete: a save cut
    by a time limit or a preemption leaves it without its last files (trainer_state.json is written last), or with a
    truncated weights file."""
    if not ckpt.is_dir():
        return "not a folder"
    missing = [name for name in (TRAINER_STATE, *CHECKPOINT_NEEDS) if not (ckpt / name).is_file()]
    weights = [ckpt / name for name in CHECKPOINT_WEIGHTS if (ckpt / name).is_file()]
    if not weights:
        missing.insert(0, " or ".join(CHECKPOINT_WEIGHTS))
    if missing:
        return "no " + ", ".join(missing)
    for path in [*weights, *sorted(ckpt.glob("*.safetensors"))]:
        if (problem := safetensors_problem(path)) is not None:
            return f"{path.name} is truncated ({problem})"
    try:
        json.loads((ckpt / TRAINER_STATE).read_text())
    except (ValueError, OSError) as e:
        return f"{TRAINER_STATE} is not valid JSON ({e})"
    return None


def newest_complete_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the complete ``checkpoint-N`` of ``run_dir`` with the highest N, or None; the newer incomplete ones skipped,
    each with why). What ``--resume_from_checkpoint last`` means, in both stages and in a requeued cluster job."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        step = path.name[len("checkpoint-"):]
        if step.isdigit():
            found.append((int(step), path))
    skipped = []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def read_run_config(ckpt_dir: str | Path) -> dict:
    from flare.errors import CheckpointError

    path = Path(ckpt_dir) / "run_config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no run_config.json; --load_ckpt must be a run directory of run_task_ft.py")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file was cut or edited; re-run run_task_ft.py "
                              "for this run") from e
