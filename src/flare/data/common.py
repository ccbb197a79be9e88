"""Helpers shared by the task loaders: split names, errors that name the file and the row, hub access."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from flare.errors import FlareError, HubError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class DataFormatError(FlareError, ValueError):
    """A data file exists but its content is wrong; the message names the file and the row."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}\nexpected layout under the data dir: {layout}")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty")
    return path


def map_label(value, label_names: tuple[str, ...], where: str) -> int:
    """Map a string label (or an integer id given as int/str) to its class id; fail naming ``where``."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in label_names:
            return label_names.index(key)
        if key.lstrip("-").isdigit():
            value = int(key)
    if isinstance(value, int) and 0 <= value < len(label_names):
        return value
    raise DataFormatError(f"{where}: label {value!r} is not one of {list(label_names)} (or 0..{len(label_names) - 1})")


def hub_load(path: str, name: str | None, split: str) -> datasets.Dataset:
    """Load one split of a hub dataset. Tests replace this function to feed in-memory hub-schema datasets."""
    try:
        return datasets.load_dataset(path, name, split=split)
    except ConnectionError as e:
        raise HubError(f"could not load the data set {path!r} from the Hugging Face hub ({e}); pass --data_dir "
                       "data to read the repository's local copies, or run where the hub can be reached") from e


def check_columns(ds: datasets.Dataset, required: tuple[str, ...], where: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataFormatError(f"{where}: missing column(s) {missing}; found {ds.column_names}")
