"""The translation file layout, in one place: written by run_translate.py, read by run.py (and the tests).

    {output_dir}/{task}/translate-{tgt}-{mt}/{train|val|test}_{src}-{tgt}.parquet   + meta.json

Each file has the split's original columns (the ``src`` language), ``{field}_translated`` per translated field
(TyDiQA also ``answers_translated``) and ``language``.
"""

from __future__ import annotations

from pathlib import Path

from flare.config import TASKS

SPLIT_FILE = {"train": "train", "validation": "val", "test": "test"}  # the original's file names
FOLDER_PREFIX = "translate-"
META_FILE = "meta.json"
TRANSLATED_SPLITS = {task: info.translated_splits for task, info in TASKS.items()}  # read from the task table


def folder_name(tgt: str, mt: str) -> str:
    """``translate-{tgt}-{mt}``: everything translated INTO ``tgt`` by ``mt``; ``tgt`` as its canonical code (TyDiQA's
    ``id`` and ``indonesian`` are ``ind``), so the writer, its meta.json and every reader name one folder."""
    from flare.languages import resolve

    try:
        tgt = resolve(tgt).code
    except ValueError:
        pass  # an unknown code fails where the language is checked, with the list of valid ones
    return f"{FOLDER_PREFIX}{tgt}-{mt}"


def translation_folder(output_dir: str | Path, task: str, tgt: str, mt: str) -> Path:
    return Path(output_dir) / task / folder_name(tgt, mt)


def mt_name(model: str) -> str:
    """The MT's name in folder names: ``reference`` / ``lexical``, a hub id or table name as given, a local model
    folder's name."""
    from flare.lexical_mt import is_offline_mt

    return model if is_offline_mt(model) or not Path(model).exists() else Path(model).name


def split_file(split: str, src: str, tgt: str) -> str:
    return f"{SPLIT_FILE[split]}_{src}-{tgt}.parquet"


def translated(field: str) -> str:
    """The column holding ``field``'s translation."""
    return f"{field}_translated"


def mt_of_folder(name: str, lang: str) -> str | None:
    """The MT name of a folder ``translate-{lang}-{mt}``, or None if the name has another form."""
    prefix = f"{FOLDER_PREFIX}{lang}-"
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else None


def translation_files(output_dir: str | Path, task: str, src: str, tgt: str, model: str,
                      splits: tuple[str, ...] | list[str] | None = None) -> list[Path]:
    """The files ``run_translate.py`` writes for ``src -> tgt`` (every split of the task unless ``splits``); when all
    exist it has nothing to do."""
    folder = translation_folder(output_dir, task, tgt, mt_name(model))
    return [folder / split_file(s, src, tgt) for s in (splits or TRANSLATED_SPLITS[task])]
