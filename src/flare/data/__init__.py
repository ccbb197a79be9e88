"""Task data: ``load_task(task, lang, split, data_dir=None) -> datasets.Dataset``.

``data_dir=None`` reads the Hugging Face hub copies the original code uses; ``data_dir=<root>`` reads local files in
the layout of this repository's ``data/`` folder. See each task module for the normalised columns.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from flare.data import nusax, tydiqa, xnli
from flare.data.common import SPLITS, DataFormatError, check_split
from flare.languages import check_task, check_task_language, resolve, task_languages  # noqa: F401

TASKS = {"xnli": xnli, "nusax": nusax, "tydiqa": tydiqa}
LABELS = {"xnli": xnli.LABELS, "nusax": nusax.LABELS}

__all__ = ["LABELS", "SPLITS", "TASKS", "DataFormatError", "check_task_language", "load_task"]


def load_task(task: str, lang: str, split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Load one split of one task in one language with normalised columns."""
    code = check_task_language(task, lang)
    check_split(split)
    module = TASKS[task]
    language = resolve(code)
    if data_dir is None:
        return module.load_hub(language, split)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data dir not found: {root} (expected e.g. the repository's data/ folder)")
    return module.load_local(language, split, root)
