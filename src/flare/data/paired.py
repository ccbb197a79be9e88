"""Stage-2 data: the translation files of ``run_translate.py`` paired with the task data.

A paired dataset has the TARGET-language example under the task's normal column names (what the model is trained
and scored on) and the English SOURCE side of the same example under ``src_{field}`` (what FLARE fuses and input-level
fusion prepends):

* training / validation (translate-train): ``translate-{tgt}-{mt}/{train,val}_{src}-{tgt}.parquet``; target = the
  ``*_translated`` columns, source = the original English columns.
* test: the real target test set (``load_task``) paired with ``translate-{src}-{mt}/test_{tgt}-{src}.parquet``, whose
  original columns must equal the target test set row by row and whose ``*_translated`` columns are the source.
* translate-test: the ``*_translated`` (English) columns of that file ARE the test input.

TyDiQA rows whose answer projection failed are dropped and counted; its validation set is every 10th translated
training row (the original validated on 20 training rows).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pandas as pd

from flare.config import TASKS
from flare.data.layout import META_FILE, folder_name, mt_of_folder, split_file, translated
from flare.errors import FlareError

logger = logging.getLogger(__name__)

QA_VALIDATION_EVERY = 10


class TranslationDataError(FlareError, ValueError):
    """Translation files are missing or do not line up with the task data; the message names the fix."""


@dataclass(frozen=True)
class TranslationDirs:
    forward: Path  # translate-{tgt}-{mt}: English data in the target language
    backward: Path  # translate-{src}-{mt}: target test data in English
    mt_name: str


def translation_dirs(path_mt: str | Path, src: str, tgt: str) -> TranslationDirs:
    """Both translation folders from either one (``.../translate-{tgt}-{mt}`` or ``.../translate-{src}-{mt}``)."""
    path = Path(path_mt)
    name = path.name
    for lang in (tgt, src):
        mt = mt_of_folder(name, lang)
        if mt is not None:
            return TranslationDirs(path.parent / folder_name(tgt, mt), path.parent / folder_name(src, mt), mt)
    raise TranslationDataError(f"--path_mt {path_mt}: expected a folder named translate-{tgt}-<model> or "
                               f"translate-{src}-<model>, as run_translate.py writes them")


def translate_command(task: str, src: str, tgt: str, mt: str, split: str, output_root: Path) -> str:
    return (f"python run_translate.py --task {task} --source_lang {src} --target_lang {tgt} --model {mt} "
            f"--splits {split} --output_dir {output_root}")


def read_translation(folder: Path, task: str, split: str, src: str, tgt: str, mt: str,
                     need_source: bool = True) -> pd.DataFrame:
    """One translation file; ``need_source=False`` (FLARE MT) needs only the translated columns."""
    path = folder / split_file(split, src, tgt)
    if not path.is_file():
        raise TranslationDataError(
            f"missing translation file {path}. Make it with:\n  "
            f"{translate_command(task, src, tgt, mt, split, folder.parent.parent)}\n"
            "(add --data_dir data for the local data; run_translate.sh makes every file FLARE needs)")
    meta_path = folder / META_FILE
    if meta_path.is_file():  # written by run_translate.py: the folder must hold this task's data, into tgt
        meta = json.loads(meta_path.read_text())
        if (meta.get("task"), meta.get("target_lang")) != (task, tgt):
            raise TranslationDataError(
                f"{folder} holds {meta.get('task')} translations into {meta.get('target_lang')}, not {task} into "
                f"{tgt}; pass --path_mt translations/{task}/{folder_name(tgt, mt)} (made by run_translate.py)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a cut or corrupt file
        remake = translate_command(task, src, tgt, mt, split, folder.parent.parent)
        raise TranslationDataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}); remake it "
                                   f"with --overwrite:\n  {remake} --overwrite") from e
    fields = TASKS[task].text_fields
    needed = [*(fields if need_source else ()), *(translated(f) for f in fields),
              *((translated("answers"),) if task == "tydiqa" else ("label",))]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TranslationDataError(f"{path}: columns {missing} missing; re-run run_translate.py with --overwrite")
    if df.empty:
        raise TranslationDataError(f"{path}: no rows")
    return df


def _answers(value) -> dict:
    return {"text": [str(t) for t in value["text"]], "answer_start": [int(s) for s in value["answer_start"]]}


def _projected_ok(context: str, answers: dict) -> bool:
    if not answers["text"] or not answers["text"][0] or answers["answer_start"][0] < 0:
        return False
    start = answers["answer_start"][0]
    return context[start:start + len(answers["text"][0])] == answers["text"][0]


@dataclass
class Paired:
    dataset: datasets.Dataset
    dropped: int = 0  # TyDiQA rows whose answer projection failed
    info: dict = field(default_factory=dict)


def _limit(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    return df.iloc[:n].reset_index(drop=True) if n else df


def paired_train(task: str, df: pd.DataFrame, *, with_source: bool = True, limit: int | None = None) -> Paired:
    """en->tgt file rows as (target = translation, source = English original) examples."""
    fields = TASKS[task].text_fields
    out: dict[str, list] = {f: [str(x) for x in df[translated(f)]] for f in fields}
    if with_source:
        out.update({f"src_{f}": [str(x) for x in df[f]] for f in fields})
    if task == "tydiqa":
        out["answers"] = [_answers(a) for a in df[translated("answers")]]
        if with_source and "answers" in df.columns:  # the English answers (X-Mixup trains on the source too)
            out["src_answers"] = [_answers(a) for a in df["answers"]]
        out["id"] = [str(i) for i in df["id"]] if "id" in df.columns else [str(i) for i in range(len(df))]
        keep = [i for i, (c, a) in enumerate(zip(out["context"], out["answers"])) if _projected_ok(c, a)]
        dropped = len(out["id"]) - len(keep)
        out = {k: [v[i] for i in keep] for k, v in out.items()}
    else:
        out["label"] = [int(x) for x in df["label"]]
        if "id" in df.columns:
            out["id"] = [str(x) for x in df["id"]]
        dropped = 0
    ds = datasets.Dataset.from_dict(out)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if dropped:
        logger.warning("%s: dropped %d translated training rows whose answer projection failed", task, dropped)
    return Paired(ds, dropped)


def split_qa_validation(ds: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation): every 10th row validates, so the validation set never overlaps training."""
    val = [i for i in range(len(ds)) if i % QA_VALIDATION_EVERY == QA_VALIDATION_EVERY - 1]
    train = [i for i in range(len(ds)) if i % QA_VALIDATION_EVERY != QA_VALIDATION_EVERY - 1]
    return ds.select(train), ds.select(val)


def check_lines_up(task: str, target: datasets.Dataset, df: pd.DataFrame, path: str) -> None:
    """The tgt->en file's original columns must be the target test set, row by row."""
    if len(df) != len(target):
        raise TranslationDataError(
            f"{path} has {len(df)} rows but the {task} target test set has {len(target)}: the translation does not "
            "line up with the data (was it made with other data, --max_samples or --data_dir?). Re-run "
            "run_translate.py with --overwrite and the same --data_dir.")
    for f in TASKS[task].text_fields:
        for i, (a, b) in enumerate(zip(df[f], target[f])):
            if str(a).replace('"', "") != str(b).replace('"', ""):
                raise TranslationDataError(
                    f"{path}, row {i}: {f} differs from the target test set ({str(a)[:40]!r} vs {str(b)[:40]!r}); "
                    "the translation does not line up with the data. Re-run run_translate.py with --overwrite and "
                    "the same --data_dir.")


def paired_test(task: str, target: datasets.Dataset, df: pd.DataFrame, path: str) -> Paired:
    """The real target test set with the English translation of each row as its source side."""
    check_lines_up(task, target, df, path)
    ds = target
    for f in TASKS[task].text_fields:
        ds = ds.add_column(f"src_{f}", [str(x) for x in df[translated(f)]])
    return Paired(ds)


def translate_test(task: str, target: datasets.Dataset, df: pd.DataFrame, path: str) -> Paired:
    """The target test set translated into English, scored against the target's gold labels.

    TyDiQA: the gold answers are the projected English answers (the only answers in the English context); rows
    whose projection failed are dropped and counted."""
    check_lines_up(task, target, df, path)
    ds = target
    for f in TASKS[task].text_fields:
        ds = ds.remove_columns(f).add_column(f, [str(x) for x in df[translated(f)]])
    if task != "tydiqa":
        return Paired(ds)
    answers = [_answers(a) for a in df[translated("answers")]]
    ds = ds.remove_columns("answers").add_column("answers", answers)
    keep = [i for i, (c, a) in enumerate(zip(list(ds["context"]), answers)) if _projected_ok(c, a)]
    if len(keep) < len(ds):
        logger.warning("translate-test: dropped %d test rows whose answer projection failed", len(ds) - len(keep))
    return Paired(ds.select(keep), len(ds) - len(keep))
