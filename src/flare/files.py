"""Atomic file writing, standard library only (no torch, no pandas): a reader never sees half a file."""

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
