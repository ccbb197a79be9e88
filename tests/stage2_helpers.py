"""Helpers shared by the stage-2 tests: their common flags, and identity "translations" for TyDiQA (no real MT can
project answers here)."""

from __future__ import annotations

from pathlib import Path

from flare.data import load_task
from flare.data.layout import translated, translation_folder
from flare.translate import output_path

DATA = Path(__file__).resolve().parents[1] / "data"
# a few steps on a few rows of the real data: the stage-2 tests' common flags (TyDiQA adds QA)
FAST = ["--data_dir", str(DATA), "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "2",
        "--batch_size", "8", "--lr", "1e-3", "--seed", "3"]
QA = ["--max_length", "192", "--doc_stride", "64", "--generate_max_tokens", "6"]


def write_identity_tydiqa(out: Path, data_dir: Path, tgt: str = "sw", model: str = "identity", n: int = 40) -> Path:
    """translate-{tgt}-identity/train_en-{tgt} (English copied as the 'translation') and translate-en-identity/
    test_{tgt}-en, in run_translate.py's exact schema; returns the forward folder."""
    for src, t, split in (("en", tgt, "train"), (tgt, "en", "test")):
        ds = load_task("tydiqa", src, split, data_dir)
        ds = ds.select(range(min(n, len(ds))) if split == "train" else range(len(ds)))
        df = ds.to_pandas()
        df[translated("context")], df[translated("question")] = df["context"], df["question"]
        df[translated("answers")] = [{"text": list(a["text"][:1]), "answer_start": [int(a["answer_start"][0])]}
                                    for a in df["answers"]]
        df["language"] = src
        path = output_path(out, "tydiqa", split, src, t, model)
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
    return translation_folder(out, "tydiqa", tgt, model)
