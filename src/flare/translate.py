"""Machine translation of task data (NLLB or a human-parallel reference) with QA answer-span projection.

Output, as ``run.py`` reads it: ``{output_dir}/{task}/translate-{tgt}-{model}/{split}_{src}-{tgt}.parquet`` with all
original columns, ``{field}_translated`` per translated field and ``language`` (= the source language), plus
``meta.json`` beside the files.

Speed: every unique string is translated once, strings are sorted by length into batches with dynamic padding, and
the results are put back into input order; ``torch.inference_mode``, bf16 on GPU with ``--bf16``.
Reliability: the unique strings are translated in fixed chunks, each saved atomically under ``.partial/``; a killed
run resumes from the finished chunks and ends with the same file as an uninterrupted run. Final files appear
atomically (write, then rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pandas as pd

from flare.config import TASKS, resolve_translation_model
from flare.data import load_task
from flare.data.layout import (
    META_FILE,
    SPLIT_FILE,
    TRANSLATED_SPLITS,
    mt_name,
    split_file,
    translated,
    translation_folder,
)
from flare.errors import FlareError
from flare.files import atomic_write
from flare.languages import nllb_code, resolve
from flare.lexical_mt import MIX_SEED, is_offline_mt, mix_fraction, takes_lexical
from flare.lexical_mt import scores as lexical_scores

logger = logging.getLogger(__name__)

FIELDS = {task: info.text_fields for task, info in TASKS.items()}  # the fields that get translated
SPLITS = TRANSLATED_SPLITS
MARK = '"'  # answer marker for span projection (the original's choice); removed from every QA text first
CHUNK = 256  # unique strings per resumable chunk
# no NLLB: the human translation, the statistical MT of flare.lexical_mt, and quality levels mixing the two
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer.model", "spm.model")


class TranslationError(FlareError, ValueError):
    """Bad translation input (language, model, data); the message names the fix."""


def output_path(output_dir: str | Path, task: str, split: str, src: str, tgt: str, model_name: str) -> Path:
    return translation_folder(output_dir, task, tgt, model_name) / split_file(split, src, tgt)


# ---------------------------------------------------------------------------------------------- batching
def plan_batches(texts: list[str], batch_size: int, length: Callable[[str], int] = len) -> tuple[list[str], list]:
    """Unique non-empty strings sorted by length (longest first), and batches of indices into that list.

    The caller translates ``unique`` batch by batch and maps results back with a dict: input order is restored
    whatever the batch order.
    """
    unique = sorted({t for t in texts if t.strip()}, key=lambda t: (-length(t), t))
    batches = [list(range(i, min(i + batch_size, len(unique)))) for i in range(0, len(unique), batch_size)]
    return unique, batches


@dataclass
class Stats:
    strings: int = 0
    unique: int = 0
    empty: int = 0
    truncated: int = 0
    seconds: float = 0.0
    chunks_resumed: int = 0
    extra: dict = field(default_factory=dict)


class NLLBTranslator:
    """An NLLB (M2M100-architecture) model: hub key, hub id or local directory."""

    def __init__(self, model: str, *, device: str = "cpu", max_length: int = 256, batch_size: int = 64,
                 num_beams: int = 1, bf16: bool = False):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            spec = resolve_translation_model(model, "--model")
        except ValueError as e:
            raise TranslationError(f"{e}, or 'reference', 'lexical' or 'lexical-qNN'") from e
        hint = "the model directory needs its tokenizer files (tokenizer.json / sentencepiece.bpe.model)"
        local = Path(spec.hub_id)
        if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise TranslationError(f"--model {model}: could not load its tokenizer: {hint}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.hub_id)
        except (OSError, ValueError, TypeError) as e:
            raise TranslationError(f"--model {model}: could not load its tokenizer ({e}); {hint}") from e
        probe = self.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
        if not probe or all(i == self.tokenizer.unk_token_id for i in probe):
            raise TranslationError(f"--model {model}: could not load its tokenizer (it maps text to <unk>); {hint}")
        dtype = torch.bfloat16 if (bf16 and device.startswith("cuda")) else torch.float32
        self.model = AutoModelForSeq2SeqLM.from_pretrained(spec.hub_id, dtype=dtype).to(device).eval()
        self.device, self.max_length, self.batch_size, self.num_beams = device, max_length, batch_size, num_beams

    def check_code(self, code: str, role: str) -> None:
        if self.tokenizer.convert_tokens_to_ids(code) in (None, self.tokenizer.unk_token_id):
            raise TranslationError(f"the model cannot {'read' if role == 'source' else 'write'} {code}: it is not "
                                   "one of its language tokens")

    def token_length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def translate(self, texts: list[str], src_code: str, tgt_code: str, stats: Stats,
                  logits_processors: Callable[[list[str]], list] | None = None) -> list[str]:
        """Translate a batch-planned list (already unique, sorted); returns outputs in the same order.
        ``logits_processors(batch)``: extra generation logits processors for one batch (benchmarks)."""
        import torch

        self.tokenizer.src_lang = src_code
        forced = self.tokenizer.convert_tokens_to_ids(tgt_code)
        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length)
            full = self.tokenizer(batch, add_special_tokens=True)["input_ids"]
            stats.truncated += sum(len(ids) > self.max_length for ids in full)
            with torch.inference_mode():
                generated = self.model.generate(**enc.to(self.device), forced_bos_token_id=forced,
                                                max_length=self.max_length, num_beams=self.num_beams,
                                                do_sample=False,
                                                logits_processor=logits_processors(batch) if logits_processors
                                                else None)
            out += self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return out


# ---------------------------------------------------------------------------------------------- QA projection
def mark_answer(context: str, answer: str, answer_start: int) -> str:
    """Remove every marker from the context and wrap the answer span in markers.

    The start shifts by the markers removed BEFORE the answer only (the original subtracted all of them).
    """
    before = context[:answer_start].count(MARK)
    clean = context.replace(MARK, "")
    start = answer_start - before
    answer_clean = answer.replace(MARK, "")
    end = start + len(answer_clean)
    return clean[:start] + MARK + clean[start:end] + MARK + clean[end:]


def project_answer(translated: str) -> tuple[str, str, int]:
    """From a translation of a marked context: (context without markers, answer text, answer start or -1)."""
    first, last = translated.find(MARK), translated.rfind(MARK)
    clean = translated.replace(MARK, "")
    if first == -1 or last == first:
        return clean, "", -1
    answer = translated[first + 1:last].replace(MARK, "")
    stripped = answer.strip()
    if not stripped:
        return clean, "", -1
    start = first + (len(answer) - len(answer.lstrip()))
    return clean, stripped, start


# ---------------------------------------------------------------------------------------------- chunks and files
def translate_unique(translator: NLLBTranslator, texts: list[str], src_code: str, tgt_code: str, partial: Path,
                     stats: Stats, progress: Callable[[int], None] | None = None,
                     shard: tuple[int, int] | None = None) -> dict[str, str] | None:
    """Translate the unique strings of ``texts`` in resumable chunks; returns {source string: translation}.

    ``shard=(i, n)`` translates only the chunks ``c`` with ``c % n == i`` (the chunks are a deterministic function of
    the texts, so ``n`` processes split the work without talking to each other); it returns None while another
    shard's chunk is still missing. A later run without a shard finds every chunk on disk and writes the file."""
    unique, _ = plan_batches(texts, translator.batch_size, translator.token_length)
    stats.strings += len(texts)
    stats.unique += len(unique)
    stats.empty += sum(1 for t in texts if not t.strip())
    result: dict[str, str] = {}
    complete = True
    for c, start in enumerate(range(0, len(unique), CHUNK)):
        chunk = unique[start:start + CHUNK]
        path = partial / f"chunk-{c:05d}.json"
        try:  # a sibling shard may merge and remove the chunks at any moment
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            saved = None
        if saved is not None:
            if saved["source"] == chunk:
                result.update(zip(chunk, saved["translation"]))
                stats.chunks_resumed += 1
                continue
        if shard is not None and c % shard[1] != shard[0]:
            complete = False  # another shard's chunk
            continue
        translated = translator.translate(chunk, src_code, tgt_code, stats)
        partial.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"source": chunk, "translation": translated}, ensure_ascii=False)
        atomic_write(path, lambda p, payload=payload: p.write_text(payload, encoding="utf-8"))
        result.update(zip(chunk, translated))
        if progress:
            progress(len(chunk))
    if not complete:
        return None
    result.update({t: "" for t in texts if not t.strip()})
    return result


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda p: df.to_parquet(p, index=False))


# ---------------------------------------------------------------------------------------------- per split
def translate_split(task: str, ds: datasets.Dataset, translate: Callable[[str, list[str]], list[str]]) -> tuple:
    """Add ``{field}_translated`` columns (and for TyDiQA the projected ``answers_translated``).

    ``translate(field, texts)`` returns one translation per text, in order.
    """
    df = ds.to_pandas()
    counts: dict[str, int] = {}
    if task == "tydiqa":
        marked = [mark_answer(c, a["text"][0], int(a["answer_start"][0]))
                  for c, a in zip(df["context"], df["answers"])]
        questions = [q.replace(MARK, "") for q in df["question"]]
        ctx_t, q_t = translate("context", marked), translate("question", questions)
        projected = [project_answer(t) for t in ctx_t]
        df[translated("context")] = [p[0] for p in projected]
        df[translated("question")] = q_t
        df[translated("answers")] = [{"text": [p[1]], "answer_start": [p[2]]} for p in projected]
        lost = sum(1 for p in projected if p[2] < 0)
        counts.update(answers_projected=len(projected) - lost, answers_lost=lost)
    else:
        for f in FIELDS[task]:
            df[translated(f)] = translate(f, list(df[f]))
    return df, counts


def parallel_target(task: str, src: str, tgt: str, split: str, data_dir: str | Path | None,
                    source: datasets.Dataset, backend: str = "reference") -> datasets.Dataset:
    """The ``tgt`` rows of ``split`` that are the human translation of ``source``'s rows (same order), checked."""
    if task == "tydiqa":
        raise TranslationError(f"--model {backend} needs a human-parallel corpus: NusaX (same id) or XNLI (same "
                               "line); TyDiQA is not parallel. Use an NLLB model for TyDiQA.")
    target = load_task(task, tgt, split, data_dir)
    if len(target) < len(source):
        raise TranslationError(f"{task} {split}: {src} has {len(source)} rows but {tgt} has {len(target)}; the "
                               f"{backend} backend needs parallel files")
    target = target.select(range(len(source)))  # --max_samples cut the source
    if task == "nusax" and list(target["id"]) != list(source["id"]):
        raise TranslationError(f"nusax {split}: ids of {src} and {tgt} differ; the files are not parallel")
    if list(target["label"]) != list(source["label"]):
        raise TranslationError(f"{task} {split}: labels of {src} and {tgt} differ; the files are not parallel")
    return target


def reference_split(task: str, src: str, tgt: str, split: str, data_dir: str | Path | None,
                    source: datasets.Dataset) -> pd.DataFrame:
    """The human translation of a parallel corpus as the ``_translated`` columns (oracle MT)."""
    target = parallel_target(task, src, tgt, split, data_dir, source)
    df = source.to_pandas()
    for f in FIELDS[task]:
        df[translated(f)] = list(target[f])
    return df


LEXICAL_CORPUS = {"tydiqa": "nusax"}  # a task without parallel text: the lexical MT learns from another's pairs


def train_lexical(task: str, src: str, tgt: str, data_dir: str | Path | None):
    """The word-level statistical MT ``src -> tgt`` (flare.lexical_mt), trained on the TRAINING split's pairs only,
    and what it was trained on (for meta.json). TyDiQA is not parallel: its lexical MT learns from NusaX's training
    pairs of the same two languages (English and Indonesian are the only TyDiQA languages NusaX has)."""
    from flare.languages import task_languages
    from flare.lexical_mt import LexicalTranslator

    corpus = LEXICAL_CORPUS.get(task, task)
    if corpus != task:
        missing = [lang for lang in (src, tgt) if lang not in task_languages(corpus)]
        if missing:
            both = sorted(set(task_languages(task)) & set(task_languages(corpus)))
            raise TranslationError(f"--model lexical for {task} learns from the parallel {corpus} training pairs, "
                                   f"which have no {', '.join(missing)}; the {task} languages it can translate: "
                                   f"{', '.join(both)}")
    task_of_task = task
    task = corpus
    try:
        source = load_task(task, src, "train", data_dir)
        target = parallel_target(task, src, tgt, "train", data_dir, source, backend="lexical")
    except TranslationError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise TranslationError(f"--model lexical is trained on the parallel TRAINING split of {task} ({src} and "
                               f"{tgt}), which could not be read: {e}") from e
    pairs_src = [str(x) for f in FIELDS[task] for x in source[f]]
    pairs_tgt = [str(x) for f in FIELDS[task] for x in target[f]]
    model = LexicalTranslator(pairs_src, pairs_tgt)
    trained_on = dict(task=task, split="train", source_lang=src, target_lang=tgt, data_dir=data_dir,
                      rows=len(source), fields=list(FIELDS[task]), **model.describe(),
                      **({"translates": task_of_task, "note": f"{task_of_task} is not parallel: the MT learned "
                          f"from {task}'s training pairs (out of domain)"} if task_of_task != task else {}))
    return model, trained_on


def _source(job, src: str, split: str) -> datasets.Dataset:
    path = job.parquet_inputs.get(split)
    if path is None:
        return load_task(job.task, src, split, job.data_dir)
    if not Path(path).is_file():
        raise TranslationError(f"--path_{split} {path}: no such file")
    df = pd.read_parquet(path)
    if "lang" in df.columns:
        df = df[df["lang"] == src].drop(columns=["lang"]).reset_index(drop=True)
    if df.empty:
        raise TranslationError(f"--path_{split} {path}: no rows for language {src}")
    return datasets.Dataset.from_pandas(df, preserve_index=False)


@dataclass
class TranslateJob:
    task: str
    source_lang: str
    target_lang: str
    model: str  # nllb-600m | nllb-3.3b | a local directory | reference
    output_dir: Path = Path("translations")
    data_dir: str | None = None
    splits: tuple[str, ...] | None = None
    max_samples: int | None = None
    max_length: int = 256
    batch_size: int = 64
    num_beams: int = 1
    device: str = "cpu"
    bf16: bool = False
    overwrite: bool = False
    no_fallback: bool = False
    parquet_inputs: dict = field(default_factory=dict)  # split -> parquet file (the original's TyDiQA inputs)
    shard: tuple[int, int] | None = None  # (i, n): this process translates every n-th chunk, starting at i

    @property
    def model_name(self) -> str:
        return mt_name(self.model)

    @property
    def folder(self) -> Path:
        return translation_folder(self.output_dir, self.task, self.target_lang, self.model_name)


def run_job(job: TranslateJob, translator_factory: Callable[[], NLLBTranslator] | None = None) -> dict:
    """Translate every requested split; skip finished files unless ``overwrite``; returns the meta dict."""
    from tqdm.auto import tqdm

    from flare.data import check_task_language

    src = check_task_language(job.task, job.source_lang)
    tgt_lang = resolve(job.target_lang)
    splits = job.splits or SPLITS[job.task]
    bad = [s for s in splits if s not in SPLITS[job.task]]
    if bad:
        raise TranslationError(f"--splits {bad}: {job.task} translates {list(SPLITS[job.task])}")
    nllb = not is_offline_mt(job.model)
    mix = mix_fraction(job.model)  # lexical-qNN: that fraction of the rows lexical, the rest the human translation
    # NLLB's language codes (and its Indonesian fallback) matter only to NLLB
    src_code, src_fallback = nllb_code(src, allow_fallback=not job.no_fallback or not nllb)
    tgt_code, tgt_fallback = nllb_code(tgt_lang.code, allow_fallback=not job.no_fallback or not nllb)
    warnings = []
    for lang, fb in ((src, src_fallback), (tgt_lang.code, tgt_fallback)):
        if fb and nllb:
            msg = (f"NLLB has no {resolve(lang).name} ({lang}): using Indonesian (ind_Latn) instead, as the original "
                   "did. These 'translations' are Indonesian. Pass --no_fallback to refuse.")
            logger.warning("!!! %s", msg)
            warnings.append(msg)
    targets = {s: output_path(job.output_dir, job.task, s, src, tgt_lang.code, job.model_name) for s in splits}
    todo = [s for s, p in targets.items() if job.overwrite or not p.is_file()]
    meta_path = job.folder / META_FILE
    if not todo:
        logger.info("all %d files exist in %s (pass --overwrite to redo)", len(targets), job.folder)
        return read_meta(meta_path)
    sources = {s: _source(job, src, s) for s in todo}  # fail early on missing data
    if job.max_samples:
        sources = {s: d.select(range(min(job.max_samples, len(d)))) for s, d in sources.items()}
    translator, lexical = None, None
    if mix is not None and job.task in LEXICAL_CORPUS:
        raise TranslationError(f"--model {job.model} mixes the lexical MT with the human translation, which "
                               f"{job.task} does not have; use --model lexical")
    if job.model == "lexical" or mix is not None:
        lexical, trained_on = train_lexical(job.task, src, tgt_lang.code, job.data_dir)
    elif nllb:
        translator = translator_factory() if translator_factory else NLLBTranslator(
            job.model, device=job.device, max_length=job.max_length, batch_size=job.batch_size,
            num_beams=job.num_beams, bf16=job.bf16)
        translator.check_code(src_code, "source")
        translator.check_code(tgt_code, "target")
    direction = f"{src}-{tgt_lang.code}"
    top = dict(task=job.task, source_lang=src, target_lang=tgt_lang.code, model=job.model,
                nllb_source=src_code if nllb else None, nllb_target=tgt_code if nllb else None,
                fallback_warnings=warnings,
                settings=dict(max_length=job.max_length, batch_size=job.batch_size, num_beams=job.num_beams,
                              bf16=job.bf16, device=job.device, data_dir=job.data_dir, max_samples=job.max_samples))
    def partial_of(split: str) -> Path:
        return job.folder / ".partial" / f"{SPLIT_FILE[split]}_{direction}"

    for split in todo:
        if not job.overwrite and targets[split].is_file():
            logger.info("%s was written by another process meanwhile", targets[split])
            shutil.rmtree(partial_of(split), ignore_errors=True)
            continue
        t0, stats, ds = time.time(), Stats(), sources[split]
        partial = partial_of(split)
        if job.model == "reference":
            df, counts = reference_split(job.task, src, tgt_lang.code, split, job.data_dir, ds), {}
            stats.strings = len(ds) * len(FIELDS[job.task])
        elif lexical is not None:
            df, counts = translate_split(job.task, ds, lambda _field, texts: lexical.translate(texts))
            stats.strings = len(ds) * len(FIELDS[job.task])
            if job.task in LEXICAL_CORPUS:  # not parallel: no human translation to score against
                counts = dict(counts, trained_on=trained_on, against_human=None)
            else:
                human = parallel_target(job.task, src, tgt_lang.code, split, job.data_dir, ds, backend=job.model)
                if mix is not None:  # the rows the hash leaves to the human translation take it
                    ids = [str(i) for i in (df["id"] if "id" in df.columns else range(len(df)))]
                    lexical_rows = [takes_lexical(i, mix) for i in ids]
                    for f in FIELDS[job.task]:
                        df[translated(f)] = [t if lex else str(h) for t, h, lex in
                                             zip(df[translated(f)], human[f], lexical_rows)]
                    counts["mix"] = dict(fraction=mix, rows_lexical=sum(lexical_rows),
                                         rows_human=len(lexical_rows) - sum(lexical_rows), seed=MIX_SEED)
                hyp = [str(x) for f in FIELDS[job.task] for x in df[translated(f)]]
                ref = [str(x) for f in FIELDS[job.task] for x in human[f]]
                counts = dict(counts, trained_on=trained_on, against_human=dict(
                    **lexical_scores(hyp, ref), in_sample=split == "train",
                    note="the MT model was trained on this split" if split == "train" else
                    "the MT model never saw this split"))
        else:
            bar = tqdm(desc=f"{job.task} {split} {direction}", unit="str")
            waiting: list[str] = []  # fields with chunks of other shards still missing

            def translate(name, texts, _partial=partial, _stats=stats, _bar=bar, _waiting=waiting):
                mapping = translate_unique(translator, texts, src_code, tgt_code, _partial / name, _stats, _bar.update,
                                           shard=job.shard)
                if mapping is None:
                    _waiting.append(name)
                    return [""] * len(texts)
                return [mapping[t] for t in texts]

            df, counts = translate_split(job.task, ds, translate)
            bar.close()
            if not job.overwrite and targets[split].is_file():  # a sibling merged every chunk meanwhile
                shutil.rmtree(partial, ignore_errors=True)  # (chunks this process wrote after the merge)
                continue
            if waiting:
                logger.info("shard %d/%d of %s %s: its chunks are done; the other shards' are not all there yet. "
                            "When every shard has finished, run the same command without --shard: it writes the "
                            "file from the chunks", job.shard[0], job.shard[1], split, direction)
                continue
        df["language"] = src
        write_parquet(df, targets[split])
        shutil.rmtree(partial, ignore_errors=True)
        stats.seconds = time.time() - t0
        entry = dict(rows=len(df), file=targets[split].name, strings=stats.strings, unique_strings=stats.unique,
                     empty_strings=stats.empty, truncated_inputs=stats.truncated, seconds=round(stats.seconds, 2),
                     chunks_resumed=stats.chunks_resumed, **counts)
        if stats.truncated:
            logger.warning("%s: %d inputs longer than --max_length %d were truncated", split, stats.truncated,
                           job.max_length)
        update_meta(meta_path, top, targets[split].stem, entry)
        logger.info("wrote %s (%d rows, %.1f s)", targets[split], len(df), stats.seconds)
    with contextlib.suppress(OSError):  # not empty, or a sibling process removed it at the same moment
        (job.folder / ".partial").rmdir()
    return read_meta(meta_path)


def read_meta(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_meta(path: Path, top: dict, key: str, entry: dict) -> None:
    """Add one file's entry (``splits[key]``, key = the file's stem, e.g. ``test_jav-en``: the folder of English
    translations holds every language's test set) to ``meta.json``, under an exclusive lock, re-reading the file
    first: parallel translation jobs writing into one folder keep each other's entries."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".meta.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = read_meta(path)
        meta.update(top)
        meta.setdefault("splits", {})[key] = entry
        atomic_write(path, lambda p: p.write_text(json.dumps(meta, indent=2, ensure_ascii=False)))
