"""Extractive QA for encoders: features with doc stride and offset mapping, and n-best post-processing.

Post-processing is a pure function of the logits and the features, like transformers' ``utils_qa.py``.
"""

from __future__ import annotations

import collections

import numpy as np


def windows(examples: dict, tokenizer, max_length: int, doc_stride: int):
    """Question + context windows (context overflowing with ``doc_stride`` overlap) and the context's sequence id;
    the question goes first with right padding, second with left padding (so the context is never padded over).
    The context tokens' character offsets are trimmed of whitespace (:func:`trim_offsets`)."""
    pad_right = tokenizer.padding_side == "right"
    enc = tokenizer(
        examples["question" if pad_right else "context"], examples["context" if pad_right else "question"],
        truncation="only_second" if pad_right else "only_first", max_length=max_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
    )
    ctx_id = 1 if pad_right else 0
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        enc["offset_mapping"][i] = trim_offsets(enc["offset_mapping"][i], enc.sequence_ids(i),
                                                examples["context"][sample], ctx_id)
    return enc, ctx_id


def trim_offsets(offsets: list, seq_ids: list, context: str, ctx_id: int) -> list:
    """Context token offsets without the whitespace they cover. SentencePiece tokenizers (XLM-R's, me5-small's) mark a
    word start with "▁", and their fast tokenizers map that mark to the space before the word: the offsets of
    "▁Amos" in "... Amos" start at the space, so a predicted span began with a space (measured on the real me5-small
    tokenizer, 814 of the 900 TyDiQA dev answers came back with a leading space; the SQuAD normalisation hid it from
    EM/F1, not from the predictions). A token that is only whitespace gets the empty span at its end."""
    out = list(offsets)
    for k, (sid, (start, end)) in enumerate(zip(seq_ids, offsets)):
        if sid != ctx_id or end <= start:
            continue
        piece = context[start:end]
        lead, trail = len(piece) - len(piece.lstrip()), len(piece) - len(piece.rstrip())
        out[k] = (start + lead, max(end - trail, start + lead)) if lead < len(piece) else (end, end)
    return out


def answer_span_audit(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    """For every example (its first gold answer): does the token span that training labels map back, through the
    offsets, to exactly the gold text in some window? ``{"examples", "exact", "reasons": {reason: [ids]}}`` with the
    reasons: "not in any window" (truncation lost it), "starts inside a token" / "ends inside a token" (a token
    straddles the answer's edge, e.g. Korean "1901년부터" for "1901년": the nearest token span is wider),
    "other" (anything else: a bug)."""
    enc = prepare_train_features(examples, tokenizer, max_length, doc_stride, keep_sample_map=True)
    # prepare_train_features consumed the offsets: the same windows again for them
    offsets = windows(examples, tokenizer, max_length, doc_stride)[0]["offset_mapping"]
    best: dict[int, str] = {}
    for i, (s, e) in enumerate(zip(enc["start_positions"], enc["end_positions"])):
        j, ids = enc["sample_map"][i], enc["input_ids"][i]
        if s == e == (ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0):
            continue  # the answer is not in this window (labelled CLS)
        gold_start = examples["answers"][j]["answer_start"][0]
        gold_end = gold_start + len(examples["answers"][j]["text"][0])
        start, end = offsets[i][s][0], offsets[i][e][1]
        verdict = ("exact" if (start, end) == (gold_start, gold_end) else "starts inside a token" if start < gold_start
                   else "ends inside a token" if end > gold_end else "other")
        if best.get(j) != "exact":
            best[j] = verdict
    reasons: dict[str, list[str]] = {}
    for j, example_id in enumerate(examples["id"]):
        verdict = best.get(j, "not in any window")
        if verdict != "exact":
            reasons.setdefault(verdict, []).append(example_id)
    return {"examples": len(examples["id"]), "exact": sum(v == "exact" for v in best.values()), "reasons": reasons}


def prepare_train_features(examples: dict, tokenizer, max_length: int, doc_stride: int,
                           keep_sample_map: bool = False) -> dict:
    """Tokenise question + context windows; label each window with the first gold answer's token span (or CLS)."""
    enc, ctx_id = windows(examples, tokenizer, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    if keep_sample_map:  # window -> example within this map batch (stage 2 attaches per-example source inputs)
        enc["sample_map"] = list(sample_map)
    offsets_all = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(offsets_all):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        seq_ids = enc.sequence_ids(i)
        answers = examples["answers"][sample_map[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        tok_start = next(k for k, s in enumerate(seq_ids) if s == ctx_id)
        tok_end = len(seq_ids) - 1 - next(k for k, s in enumerate(reversed(seq_ids)) if s == ctx_id)
        if not (offsets[tok_start][0] <= start_char and offsets[tok_end][1] >= end_char):
            enc["start_positions"].append(cls_index)  # the answer is not in this window
            enc["end_positions"].append(cls_index)
            continue
        while tok_start < len(offsets) and seq_ids[tok_start] == ctx_id and offsets[tok_start][0] <= start_char:
            tok_start += 1
        while seq_ids[tok_end] == ctx_id and offsets[tok_end][1] >= end_char:
            tok_end -= 1
        enc["start_positions"].append(tok_start - 1)
        enc["end_positions"].append(tok_end + 1)
    return enc


def prepare_eval_features(examples: dict, tokenizer, max_length: int, doc_stride: int,
                          keep_sample_map: bool = False) -> dict:
    """Like :func:`prepare_train_features` but keeps ``example_id`` and context-only offsets for post-processing."""
    enc, ctx_id = windows(examples, tokenizer, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    if keep_sample_map:
        enc["sample_map"] = list(sample_map)
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_map[i]])
        offsets = enc["offset_mapping"][i]
        enc["offset_mapping"][i] = [o if seq_ids[k] == ctx_id else None for k, o in enumerate(offsets)]
    return enc


def postprocess_predictions(examples, features, start_logits: np.ndarray, end_logits: np.ndarray,
                            n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best answer TEXT per example id: the highest start+end logit span over all its windows.

    ``start_logits``/``end_logits``: (n_features, seq_len) arrays (padded positions may hold anything; they have
    no offsets and are never chosen). The ``n_best`` starts and ends are taken among the CONTEXT tokens only, so
    high scores on the question, the special tokens or the padding can neither be chosen nor crowd the context's
    candidates out (they used to: an example whose 20 best starts all lay outside the context got no answer).
    Nor can a whitespace-only token be an answer's first or last token. Spans must have end >= start and at most
    ``max_answer_length`` tokens. An example with no valid span gets the
    empty string.
    """
    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_per_example[example_id].append(i)
    predictions: dict[str, str] = {}
    for example in examples:
        context, best_score, best_text = example["context"], -np.inf, ""
        for fi in features_per_example[example["id"]]:
            offsets = features["offset_mapping"][fi]
            n = len(offsets)
            s_log, e_log = start_logits[fi][:n], end_logits[fi][:n]
            # a token that is only whitespace (its trimmed span is empty) is no answer edge either
            context_tokens = np.array([o is not None and o[1] > o[0] for o in offsets], dtype=bool)
            best_starts = [k for k in np.argsort(s_log)[::-1] if context_tokens[k]][:n_best]
            best_ends = [k for k in np.argsort(e_log)[::-1] if context_tokens[k]][:n_best]
            for s in best_starts:
                for e in best_ends:
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_log[s] + e_log[e]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        predictions[example["id"]] = best_text
    return predictions
