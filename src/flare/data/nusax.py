"""NusaX-Senti: local ``nusax/<language>/{train,valid,test}.csv`` or the hub's ``indonlp/NusaX-senti``.

Normalised columns: ``id`` (string, the same id across languages: the corpus is parallel), ``text``,
``label`` (0 negative, 1 neutral, 2 positive).
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets

from flare.config import TASKS
from flare.data.common import DataFormatError, check_columns, hub_load, map_label, require_file
from flare.languages import Language

LABELS = TASKS["nusax"].labels  # the task table's verbalizer order is the class order
HUB_ID = "indonlp/NusaX-senti"
LAYOUT = "nusax/<language name>/{train,valid,test}.csv (header id,text,label; labels negative/neutral/positive)"
FILE_SPLIT = {"train": "train", "validation": "valid", "test": "test"}
FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "text": datasets.Value("string"), "label": datasets.Value("int64")}
)


def load_local(lang: Language, split: str, root: Path) -> datasets.Dataset:
    path = require_file(root / "nusax" / lang.name / f"{FILE_SPLIT[split]}.csv", LAYOUT)
    rows = {"id": [], "text": [], "label": []}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "text", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for rowno, row in enumerate(reader, start=2):  # line 1 is the header
            rows["id"].append(str(row["id"]).strip())
            rows["text"].append(row["text"])
            rows["label"].append(map_label(row["label"], LABELS, f"{path}, line {rowno}"))
    if not rows["id"]:
        raise DataFormatError(f"{path}: the file has a header but no rows")
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def normalise_hub(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    check_columns(ds, ("id", "text", "label"), where)
    labels = [map_label(v, LABELS, f"{where}, row {i}") for i, v in enumerate(ds["label"])]
    return datasets.Dataset.from_dict(
        {"id": [str(i) for i in ds["id"]], "text": ds["text"], "label": labels}, features=FEATURES
    )


def load_hub(lang: Language, split: str) -> datasets.Dataset:
    return normalise_hub(hub_load(HUB_ID, lang.nusax, split), f"{HUB_ID}[{lang.nusax}] {split}")
