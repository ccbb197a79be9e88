"""XNLI: local XTREME-layout TSV files or the hub's ``facebook/xnli`` per-language configs.

Normalised columns: ``premise``, ``hypothesis``, ``label`` (0 entailment, 1 neutral, 2 contradiction).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from flare.config import TASKS
from flare.data.common import DataFormatError, check_columns, hub_load, map_label, require_file
from flare.languages import Language

LABELS = TASKS["xnli"].labels  # the task table's verbalizer order is the class order
HUB_ID = "facebook/xnli"
LAYOUT = "xnli/{dev,test}-<lang>.tsv (tab-separated, no header: premise, hypothesis, label)"
FEATURES = datasets.Features(
    {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"), "label": datasets.Value("int64")}
)


def load_local(lang: Language, split: str, root: Path) -> datasets.Dataset:
    if split == "train":
        raise ValueError(
            "XNLI has no local train split (no MultiNLI train file is shipped in data/xnli). Train on the English dev "
            "set instead (run_task_ft.py --train_split validation), or load the hub copy (no --data_dir)."
        )
    path = require_file(root / "xnli" / f"{'dev' if split == 'validation' else 'test'}-{lang.xnli}.tsv", LAYOUT)
    rows = {"premise": [], "hypothesis": [], "label": []}
    # The text may contain '"': split on tabs, never use csv quoting.
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataFormatError(f"{path}, line {lineno}: expected 3 tab-separated fields, found {len(fields)}")
            rows["premise"].append(fields[0])
            rows["hypothesis"].append(fields[1])
            rows["label"].append(map_label(fields[2], LABELS, f"{path}, line {lineno}"))
    if not rows["label"]:
        raise DataFormatError(f"{path}: the file has no rows")
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def normalise_hub(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    check_columns(ds, ("premise", "hypothesis", "label"), where)
    ds = ds.select_columns(["premise", "hypothesis", "label"])
    labels = [map_label(v, LABELS, f"{where}, row {i}") for i, v in enumerate(ds["label"])]
    return datasets.Dataset.from_dict(
        {"premise": ds["premise"], "hypothesis": ds["hypothesis"], "label": labels}, features=FEATURES
    )


def load_hub(lang: Language, split: str) -> datasets.Dataset:
    return normalise_hub(hub_load(HUB_ID, lang.xnli, split), f"{HUB_ID}[{lang.xnli}] {split}")
