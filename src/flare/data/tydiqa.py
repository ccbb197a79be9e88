"""TyDiQA-GoldP: local SQuAD-format JSON (XTREME file names) or the hub's ``google-research-datasets/tydiqa``.

Normalised columns: ``id``, ``title``, ``context``, ``question``, ``answers`` = ``{"text": [...],
"answer_start": [...]}`` with ALL gold answers kept.

Splits. GoldP has no test split: ``test`` is the official dev set (the hub's ``validation``), as in the paper.
``validation`` is a real held-out set (the original used 20 training rows): every 10th row of the language's train
data (index % 10 == 9), and ``train`` is the other 90%. Deterministic, so stage 1 and stage 2 agree.

Every answer is checked: ``context[answer_start:answer_start + len(text)] == text``. Where it does not hold (the hub
copy strips whitespace without shifting offsets) the text is re-found in the context at the occurrence nearest to the
given offset; answers that cannot be found are dropped, and questions left without answers too, with a log line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from flare.data.common import DataFormatError, check_columns, hub_load, require_file
from flare.languages import Language

logger = logging.getLogger(__name__)

HUB_ID = "google-research-datasets/tydiqa"
HUB_CONFIG = "secondary_task"
LAYOUT = (
    "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.goldp.<iso>.dev.json (test) and "
    "tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.<iso>.train.json (train/validation), SQuAD-1.1 JSON"
)
VALIDATION_EVERY = 10
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.Sequence(datasets.Value("string")),
                    "answer_start": datasets.Sequence(datasets.Value("int32"))},
    }
)


def fix_answers(context: str, texts: list[str], starts: list[int]) -> tuple[list[str], list[int], int, int]:
    """Return answers whose offsets point at their text, re-finding misplaced ones.

    Returns ``(texts, starts, n_fixed, n_dropped)``. A misplaced answer moves to the occurrence of its text nearest
    to the given offset; an answer whose text is empty or absent from the context is dropped.
    """
    out_t, out_s, fixed, dropped = [], [], 0, 0
    for text, start in zip(texts, starts):
        if text and context[start:start + len(text)] == text:
            out_t.append(text)
            out_s.append(int(start))
            continue
        occurrences, pos = [], context.find(text) if text else -1
        while pos != -1:
            occurrences.append(pos)
            pos = context.find(text, pos + 1)
        if not occurrences:
            dropped += 1
            continue
        out_t.append(text)
        out_s.append(min(occurrences, key=lambda p: abs(p - int(start))))
        fixed += 1
    return out_t, out_s, fixed, dropped


def _build(records: list[dict], where: str) -> datasets.Dataset:
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    n_fixed = n_dropped = n_questions_dropped = 0
    for rec in records:
        texts, starts, fixed, dropped = fix_answers(rec["context"], list(rec["answers"]["text"]),
                                                    list(rec["answers"]["answer_start"]))
        n_fixed += fixed
        n_dropped += dropped
        if not texts:
            n_questions_dropped += 1
            continue
        rows["id"].append(rec["id"])
        rows["title"].append(rec.get("title", ""))
        rows["context"].append(rec["context"])
        rows["question"].append(rec["question"])
        rows["answers"].append({"text": texts, "answer_start": starts})
    if n_fixed or n_dropped:
        logger.warning("%s: %d answer offsets re-found in the context, %d answers not found and dropped "
                       "(%d questions left without an answer dropped)", where, n_fixed, n_dropped, n_questions_dropped)
    if not rows["id"]:
        raise DataFormatError(f"{where}: no usable questions")
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def _holdout(records: list, split: str) -> list:
    if split == "validation":
        return [r for i, r in enumerate(records) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    if split == "train":
        return [r for i, r in enumerate(records) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    return records


def read_squad_json(path: Path) -> list[dict]:
    """Flatten a SQuAD-1.1 JSON file into one record per question (all answers kept)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(f"{path}: expected SQuAD format {{'data': [article, ...]}}")
    records = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            if "context" not in para:
                raise DataFormatError(f"{path}: article {a} paragraph {p} has no 'context'")
            for q, qa in enumerate(para.get("qas", [])):
                where = f"{path}: article {a} paragraph {p} question {q}"
                for key in ("id", "question", "answers"):
                    if key not in qa:
                        raise DataFormatError(f"{where}: missing key {key!r}")
                try:
                    texts = [ans["text"] for ans in qa["answers"]]
                    starts = [int(ans["answer_start"]) for ans in qa["answers"]]
                except (KeyError, TypeError, ValueError) as e:
                    raise DataFormatError(f"{where}: answers need 'text' and an integer 'answer_start'") from e
                records.append({"id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                                "question": qa["question"], "answers": {"text": texts, "answer_start": starts}})
    if not records:
        raise DataFormatError(f"{path}: the file has no questions")
    return records


def load_local(lang: Language, split: str, root: Path) -> datasets.Dataset:
    if split == "test":
        path = root / "tydiqa" / "tydiqa-goldp-v1.1-dev" / f"tydiqa.goldp.{lang.tydiqa}.dev.json"
    else:
        path = root / "tydiqa" / "tydiqa-goldp-v1.1-train" / f"tydiqa.goldp.{lang.tydiqa}.train.json"
    records = read_squad_json(require_file(path, LAYOUT))
    return _build(_holdout(records, split), f"{path} ({split})")


def normalise_hub(ds: datasets.Dataset, lang: Language, split: str, where: str) -> datasets.Dataset:
    """Keep the rows of one language (id prefix = language name), apply the split rule, check answers."""
    check_columns(ds, ("id", "title", "context", "question", "answers"), where)
    records = [r for r in ds if str(r["id"]).split("-")[0] == lang.name]
    return _build(_holdout(records, split), f"{where} [{lang.name}]")


def load_hub(lang: Language, split: str) -> datasets.Dataset:
    hub_split = "validation" if split == "test" else "train"
    ds = hub_load(HUB_ID, HUB_CONFIG, hub_split)
    return normalise_hub(ds, lang, split, f"{HUB_ID}[{HUB_CONFIG}] {hub_split}")
