"""Stage-2 model features: the target features of stage 1, plus what each mode adds.

* ``flare``: ``src_input_ids``/``src_attention_mask`` of the English source side (decoders: the source PROMPT only,
  as the original). Encoder QA: the English question + context is cut into doc-stride windows like the target,
  and target window k is fused with English window k, or with the last English window when the English context has
  fewer (the original fused every window with the English sequence from its start).
* ``flare-mt``: ``mt_input_ids``/``mt_attention_mask``: the MT tokenizer on the TARGET text the model sees, tagged
  with the target language's real NLLB code (the original tagged it as English). Padded on the model's side by
  the collator, so MT and model positions line up (the original right-padded one and left-padded the other).
  A decoder prompt that does not fit is shortened inside its long field for the model, and the MT text is that same
  shortened prompt (shortened further, the same way, if the MT tokenizer needs more tokens): both keep the
  template's end (the original cut the MT text on the right).
* ``xmixup`` (training only): ``src_*`` English training features with their labels (see
  :func:`xmixup_source_features`); evaluation features are the plain target ones.
* ``input-fusion``: English and target in one input (formats of the original, see ``INPUT_FUSION_TEMPLATES``); the
  English part gets at most half of the (doubled) ``max_length``. Encoders use the tokenizer's pair encoding, so
  the two texts are separated (the original concatenated NusaX texts with no separator).
"""

from __future__ import annotations

from flare import qa
from flare.config import TASKS, ModelSpec
from flare.data.features import answer_text, cut_tokens, decoder_features, encoder_cls_features, fit_example
from flare.prompts import INPUT_FUSION_TEMPLATES, decoder_prompt, encoder_text

SOURCE_PREFIX, MT_PREFIX = "src_", "mt_"


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def source_view(batch: dict, task: str) -> dict:
    """The batch with the English ``src_*`` fields under the task's field names."""
    view = dict(batch)
    for f in TASKS[task].text_fields:
        view[f] = batch[f"{SOURCE_PREFIX}{f}"]
    return view


def model_text(task: str, spec: ModelSpec, row: dict) -> str:
    """The target text as the model reads it (the MT encoder's input in FLARE MT)."""
    if spec.family == "decoder":
        return decoder_prompt(task, row)
    if TASKS[task].kind == "cls":
        return encoder_text(task, row)
    return f"{row['question']} {row['context']}"


def _input_fusion_batch(batch: dict, task: str, spec: ModelSpec, tokenizer, max_length: int) -> dict:
    """Decoders and encoder QA: fold the English source into the target fields (source first, as the original)."""
    half = max_length // 2
    batch = dict(batch)
    info = TASKS[task]
    if spec.family == "decoder":
        long_field = f"{SOURCE_PREFIX}{info.truncate_field}"
        batch[long_field] = [cut_tokens(tokenizer, t, max(half - 24, 8)) for t in batch[long_field]]
        return batch
    # encoder QA: [English question + context | target question] as the question segment, target context second
    batch["question"] = [cut_tokens(tokenizer, f"{qs} {cs}", half) + f" {qt}"
                         for qs, cs, qt in zip(batch["src_question"], batch["src_context"], batch["question"])]
    return batch


def target_features(batch: dict, *, task: str, spec: ModelSpec, tokenizer, max_length: int, doc_stride: int,
                    train: bool, input_fusion: bool = False) -> dict:
    kind = TASKS[task].kind
    if input_fusion and (spec.family == "decoder" or kind == "qa"):
        batch = _input_fusion_batch(batch, task, spec, tokenizer, max_length)
    if spec.family == "decoder":
        template = INPUT_FUSION_TEMPLATES[task] if input_fusion else None
        return decoder_features(batch, task, tokenizer, max_length, train=train, template=template)
    if kind == "cls":
        if not input_fusion:
            return encoder_cls_features(batch, task, tokenizer, max_length)
        rows = _rows(batch)
        src = [encoder_text(task, r) for r in _rows(source_view(batch, task))]
        enc = tokenizer(src, [encoder_text(task, r) for r in rows], truncation="longest_first", max_length=max_length)
        enc["labels"] = list(batch["label"])
        return enc
    prepare = qa.prepare_train_features if train else qa.prepare_eval_features
    return prepare(batch, tokenizer, max_length, doc_stride, keep_sample_map=True)


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def source_features(batch: dict, *, task: str, spec: ModelSpec, tokenizer, max_length: int,
                    doc_stride: int = 128) -> tuple[dict, list[int]]:
    """English source sequences (un-prefixed keys) and, for each, the example it belongs to: one per example, or
    (encoder QA) one per doc-stride window of the English question + context, in order."""
    view = source_view(batch, task)
    if spec.family == "decoder":
        enc = decoder_features(view, task, tokenizer, max_length, train=False)
    elif TASKS[task].kind == "cls":
        enc = encoder_cls_features(view, task, tokenizer, max_length)
    else:
        enc, _ = qa.windows(view, tokenizer, max_length, doc_stride)
        owners = list(enc["overflow_to_sample_mapping"])
        return {k: v for k, v in enc.items() if k in MODEL_KEYS}, owners
    return {k: v for k, v in enc.items() if k in MODEL_KEYS}, list(range(len(enc["input_ids"])))


XMIXUP_KEYS = (*MODEL_KEYS, "labels", "start_positions", "end_positions")


def xmixup_source_features(batch: dict, *, task: str, spec: ModelSpec, tokenizer, max_length: int, doc_stride: int,
                           sample_map: list[int]) -> dict:
    """X-Mixup's English training side, one per target feature: the English training features WITH their labels
    (decoders: prompt + answer, labels on the answer; encoder QA: doc-stride windows of the English question +
    context labelled with the English answer, window k for target window k as FLARE pairs them)."""
    view = source_view(batch, task)
    if spec.family == "decoder":
        enc, pick = decoder_features(view, task, tokenizer, max_length, train=True), sample_map
    elif TASKS[task].kind == "cls":
        enc, pick = encoder_cls_features(view, task, tokenizer, max_length), sample_map
    else:
        view["answers"] = batch["src_answers"]
        enc = qa.prepare_train_features(view, tokenizer, max_length, doc_stride, keep_sample_map=True)
        pick = match_windows(sample_map, enc["sample_map"])
    return {SOURCE_PREFIX + k: [enc[k][i] for i in pick] for k in XMIXUP_KEYS if k in enc}


def match_windows(sample_map: list[int], owners: list[int]) -> list[int]:
    """For each target feature (window k of example ``sample_map[f]``), the source sequence to fuse with: window k of
    the same example's source, or its last window if the source has fewer."""
    by_example: dict[int, list[int]] = {}
    for i, example in enumerate(owners):
        by_example.setdefault(example, []).append(i)
    seen: dict[int, int] = {}
    out = []
    for example in sample_map:
        k = seen.get(example, 0)
        seen[example] = k + 1
        windows = by_example[example]
        out.append(windows[min(k, len(windows) - 1)])
    return out


def mt_texts(batch: dict, *, task: str, spec: ModelSpec, tokenizer, mt_tokenizer, max_length: int,
             train: bool) -> list[str]:
    """The target text as the model reads it, for the MT encoder. Decoders: the prompt shortened inside its long
    field exactly as the model's (its budget leaves room for the answer in training), then further, the same way,
    until the MT tokenizer fits it in ``max_length`` (with its end-of-sequence token)."""
    rows = _rows(batch)
    if spec.family != "decoder":
        return [model_text(task, spec, r) for r in rows]
    texts = []
    for row in rows:
        budget = max_length - (len(tokenizer(answer_text(task, row), add_special_tokens=False)["input_ids"]) + 1
                               if train else 0)
        row = fit_example(task, row, tokenizer, budget)[0]
        texts.append(decoder_prompt(task, fit_example(task, row, mt_tokenizer, max_length - 1)[0]))
    return texts


def mt_features(batch: dict, *, task: str, spec: ModelSpec, tokenizer, mt_tokenizer, mt_lang_code: str,
                max_length: int, train: bool = False) -> dict:
    """The MT tokenizer on the target text the model sees, tagged with the target's NLLB code."""
    mt_tokenizer.src_lang = mt_lang_code
    texts = mt_texts(batch, task=task, spec=spec, tokenizer=tokenizer, mt_tokenizer=mt_tokenizer,
                     max_length=max_length, train=train)
    enc = mt_tokenizer(texts, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def stage2_features(batch: dict, *, task: str, spec: ModelSpec, tokenizer, max_length: int, doc_stride: int,
                    train: bool, mode: str, mt_tokenizer=None, mt_lang_code: str | None = None) -> dict:
    """Features of one ``Dataset.map(batched=True)`` batch for ``mode``; QA windows share their example's source."""
    out = target_features(batch, task=task, spec=spec, tokenizer=tokenizer, max_length=max_length,
                          doc_stride=doc_stride, train=train, input_fusion=mode == "input-fusion")
    n_examples = len(next(iter(batch.values())))
    sample_map = out.pop("sample_map", None) or list(range(n_examples))  # feature -> example within this batch
    if mode == "flare":
        source, owners = source_features(batch, task=task, spec=spec, tokenizer=tokenizer, max_length=max_length,
                                         doc_stride=doc_stride)
        pick = match_windows(sample_map, owners)
        for key, values in source.items():
            out[SOURCE_PREFIX + key] = [values[i] for i in pick]
    elif mode == "xmixup":
        if not train:
            raise ValueError("X-Mixup's source side is for training only: evaluation reads the target alone")
        out.update(xmixup_source_features(batch, task=task, spec=spec, tokenizer=tokenizer, max_length=max_length,
                                          doc_stride=doc_stride, sample_map=sample_map))
    elif mode == "flare-mt":
        mt = mt_features(batch, task=task, spec=spec, tokenizer=tokenizer, mt_tokenizer=mt_tokenizer,
                         mt_lang_code=mt_lang_code, max_length=max_length, train=train)
        for key, values in mt.items():
            out[MT_PREFIX + key] = [values[i] for i in sample_map]
    return out
