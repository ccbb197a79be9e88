"""Run files, standard library only (no torch, no pandas): atomic writers (a reader never sees half a file) and the
reader of a run directory's ``run_config.json``."""

from __future__ import annotations

import json
import os
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
