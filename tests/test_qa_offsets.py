"""Extractive QA on a REAL tokenizer (me5-small's, XLM-R's 250k SentencePiece vocabulary) and the real TyDiQA-GoldP
dev questions of all nine languages: every gold answer's character span maps to tokens and back to exactly the gold
text, or is counted with its reason; the post-processing never returns text from the question or from padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flare import qa
from flare.data import load_task

DATA = str(Path(__file__).resolve().parents[1] / "data")
LANGS = ("en", "ar", "bn", "fi", "id", "ko", "ru", "sw", "te")
# measured with max_length 384, stride 128 (the TyDiQA defaults): exact round trips of the 100 dev questions; the
# rest straddle a token edge (Korean and Telugu suffixes: "1901년부터" for "1901년"; "2012," for "2012")
EXACT = {"en": 92, "ar": 95, "bn": 97, "fi": 94, "id": 98, "ko": 87, "ru": 90, "sw": 91, "te": 74}
EDGE_REASONS = {"starts inside a token", "ends inside a token"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flare.models import embedded

    return AutoTokenizer.from_pretrained(embedded.ensure_me5_small())  # FLARE_CACHE is a temporary folder in tests


@pytest.mark.parametrize("lang", LANGS)
def test_every_gold_answer_maps_to_tokens_and_back(tokenizer, lang):
    """No answer lost to the windows, none off for another reason than a token straddling its edge; the exact
    count is the measured one (before the offsets were trimmed of SentencePiece's leading space, 86 of the 900 came
    back exactly)."""
    examples = load_task("tydiqa", lang, "test", data_dir=DATA)[:]
    audit = qa.answer_span_audit(examples, tokenizer, max_length=384, doc_stride=128)
    assert audit["examples"] == 100
    assert set(audit["reasons"]) <= EDGE_REASONS, audit["reasons"]
    assert audit["exact"] == EXACT[lang], audit
    # an edge case is a real straddle: the gold text sits inside the nearest token span, which is wider
    for example_id in audit["reasons"].get("ends inside a token", []):
        j = examples["id"].index(example_id)
        start = examples["answers"][j]["answer_start"][0]
        end = start + len(examples["answers"][j]["text"][0])
        assert end < len(examples["context"][j]) and not examples["context"][j][end].isspace()


def test_short_windows_keep_every_answer(tokenizer):
    """Contexts longer than the window: with 128-token windows and a 32-token stride the contexts overflow into many
    windows, and no answer is lost between them."""
    examples = load_task("tydiqa", "bn", "test", data_dir=DATA)[:]
    audit = qa.answer_span_audit(examples, tokenizer, max_length=128, doc_stride=32)
    assert "not in any window" not in audit["reasons"] and audit["exact"] >= 95


@pytest.mark.parametrize("lang", ["ar", "ko", "te"])
def test_postprocessing_returns_context_text_only(tokenizer, lang):
    """Adversarial logits, highest on the question tokens, the special tokens and the padding: the predicted span
    still comes from the context tokens of one window, starts and ends on a token without surrounding whitespace,
    and never crosses into the question."""
    examples = load_task("tydiqa", lang, "test", data_dir=DATA).select(range(30))
    feats = qa.prepare_eval_features(examples[:], tokenizer, max_length=192, doc_stride=64)
    width = 192 + 8  # padded past the longest feature: padding positions hold logits too
    rng = np.random.default_rng(0)
    starts, ends = rng.normal(size=(2, len(feats["input_ids"]), width))
    for i, offsets in enumerate(feats["offset_mapping"]):
        outside = [k for k in range(width) if k >= len(offsets) or offsets[k] is None]
        starts[i, outside], ends[i, outside] = 100.0, 100.0  # question, CLS/SEP, padding: the best scores
    predictions = qa.postprocess_predictions(examples, feats, starts, ends, max_answer_length=30)
    for example in examples:
        text = predictions[example["id"]]
        assert text and text in example["context"] and text == text.strip()
        assert example["question"] not in text
        spans = {(o[0], o[1]) for f, eid in enumerate(feats["example_id"]) if eid == example["id"]
                 for o in feats["offset_mapping"][f] if o is not None}
        assert any(example["context"][s:e] == text[:e - s] for s, e in spans if text.startswith(
            example["context"][s:e]) and e > s)
