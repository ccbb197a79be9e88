"""Pure functions: metrics (hand-computed), SQuAD normalisation, verbalizer parsing, QA post-processing,
decoder label masking and the collator."""

from __future__ import annotations

import numpy as np
import pytest

from flare.data.features import IGNORE_INDEX, PadCollator, decoder_features, fit_prompt
from flare.metrics import UNPARSEABLE, accuracy, classification_metrics, macro_f1, normalize_answer, qa_metrics
from flare.prompts import decoder_prompt, label_rule, parse_answer, parse_label
from flare.qa import postprocess_predictions


def test_accuracy_and_macro_f1_hand_computed():
    preds, golds = [0, 1, 2, 2, UNPARSEABLE], [0, 1, 1, 2, 2]
    assert accuracy(preds, golds) == pytest.approx(3 / 5)
    # class 0: p=1 r=1 f=1; class 1: p=1 r=1/2 f=2/3; class 2: p=1/2 r=1/2 f=1/2  -> mean 13/18
    assert macro_f1(preds, golds, 3) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert classification_metrics(preds, golds, 3)["unparseable"] == 1


def test_accuracy_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([0, 1], [0, 1, 2])


@pytest.mark.parametrize("raw,norm", [("The  Cat!", "cat"), ("an apple, a pear", "apple pear"), ("1,999.", "1999"),
                                      ("Théâtre", "théâtre")])
def test_squad_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_qa_metrics_max_over_golds():
    m = qa_metrics(["the year 1999", "Paris", ""], [["1999", "year 1999"], ["London"], ["x"]])
    assert m["exact_match"] == pytest.approx(1 / 3)  # "the year 1999" == "year 1999" after normalisation
    assert m["f1"] == pytest.approx(1 / 3)


def test_qa_f1_partial_overlap():
    # pred tokens {barack, obama}, gold {obama}: p=1/2 r=1 -> f1 = 2/3
    assert qa_metrics(["Barack Obama"], [["Obama"]])["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("text,label", [("entailment", 0), (" Neutral.", 1), ("CONTRADICTION</s>", 2),
                                        ("it is neutral", 1), ("yes", UNPARSEABLE), ("", UNPARSEABLE)])
def test_parse_label(text, label):
    assert parse_label(text, ("entailment", "neutral", "contradiction")) == label


def test_parse_answer_first_line():
    assert parse_answer("  1999\nQuestion: next") == "1999"


def test_prompts_match_the_original():
    assert decoder_prompt("xnli", {"premise": "P", "hypothesis": "H"}) == "Premise: P\nHypothesis: H\nLabel: "
    assert decoder_prompt("nusax", {"text": "T"}) == "T\nSentiment: "
    assert decoder_prompt("tydiqa", {"context": "C", "question": "Q"}) == "Context: C\nQuestion: Q\nAnswer: "


@pytest.fixture(scope="module")
def llama_tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models / "llama", padding_side="left")


def test_decoder_labels_mask_prompt_and_keep_answer_eos(llama_tok):
    batch = {"premise": ["Aku seneng"], "hypothesis": ["Dheweke lunga"], "label": [2]}
    feats = decoder_features(batch, "xnli", llama_tok, 64, train=True)
    ids, labels = feats["input_ids"][0], feats["labels"][0]
    answer = llama_tok("contradiction", add_special_tokens=False)["input_ids"] + [llama_tok.eos_token_id]
    assert ids[-len(answer):] == answer
    assert labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    eval_feats = decoder_features(batch, "xnli", llama_tok, 64, train=False)
    assert eval_feats["input_ids"][0] == ids[: len(ids) - len(answer)] and "labels" not in eval_feats


def test_long_prompt_is_cut_inside_the_context_not_the_template(llama_tok):
    example = {"context": "kata " * 400, "question": "Apa?"}
    ids, truncated = fit_prompt("tydiqa", example, llama_tok, 40)
    assert truncated and len(ids) <= 40
    text = llama_tok.decode(ids, skip_special_tokens=True)  # (the tiny tokenizer drops newlines)
    assert text.startswith("Context: kata") and text.rstrip().endswith("Apa?Answer:")


def test_collator_left_pads_and_masks_labels():
    collate = PadCollator(pad_token_id=0, padding_side="left")
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "attention_mask": [1], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    right = PadCollator(pad_token_id=1, padding_side="right")([{"input_ids": [5, 6], "labels": 2},
                                                               {"input_ids": [7], "labels": 0}])
    assert right["input_ids"].tolist() == [[5, 6], [7, 1]] and right["labels"].tolist() == [2, 0]


def test_qa_postprocess_picks_best_valid_span_across_windows():
    examples = [{"id": "q1", "context": "Mwaka 1999 alianza soka."}]
    # two windows; tokens map to characters; None = question/special tokens
    features = {"example_id": ["q1", "q1"],
                "offset_mapping": [[None, (0, 5), (6, 10), (11, 18)], [None, (11, 18), (19, 24), None]]}
    start = np.full((2, 4), -5.0)
    end = np.full((2, 4), -5.0)
    start[0, 2], end[0, 2] = 3.0, 3.0  # "1999" in window 0, score 6
    start[1, 1], end[1, 2] = 2.0, 2.0  # "alianza soka." in window 1, score 4
    start[0, 0], end[0, 0] = 9.0, 9.0  # the CLS/question token: never an answer
    assert postprocess_predictions(examples, features, start, end) == {"q1": "1999"}
    # end before start is invalid; too long spans are cut by max_answer_length
    start[0, 2], end[0, 2], end[0, 1] = -5.0, -5.0, 4.0
    start[0, 1] = 4.0
    assert postprocess_predictions(examples, features, start, end, max_answer_length=1) == {"q1": "Mwaka"}


def test_qa_train_features_label_the_answer_tokens(tiny_models):
    from transformers import AutoTokenizer

    from flare.qa import prepare_train_features

    tok = AutoTokenizer.from_pretrained(tiny_models / "xlm-roberta")
    context = "Thiago Silva alianza kucheza soka mwaka 1999 huko Brazil. " * 6
    ex = {"question": ["lini?"], "context": [context],
          "answers": [{"text": ["1999"], "answer_start": [context.index("1999")]}]}
    enc = prepare_train_features(ex, tok, max_length=32, doc_stride=8)
    assert len(enc["input_ids"]) > 1  # several windows
    found = [tok.decode(ids[s:e + 1]).strip() for ids, s, e in
             zip(enc["input_ids"], enc["start_positions"], enc["end_positions"]) if s != 0]
    assert found and all(f == "1999" for f in found)


@pytest.mark.parametrize("text,first,strict", [
    ("entailment", 0, 0), ("Entailment.", 0, 0), (" neutral\n", 1, 1),
    ("entailment because", 0, UNPARSEABLE), ("it is neutral", 1, UNPARSEABLE), ("", UNPARSEABLE, UNPARSEABLE)])
def test_parse_strict_is_the_originals_exact_match_for_xnli(text, first, strict):
    labels = ("entailment", "neutral", "contradiction")
    assert parse_label(text, labels, label_rule("xnli", "first")) == first
    assert parse_label(text, labels, label_rule("xnli", "strict")) == strict


@pytest.mark.parametrize("text,first,strict", [
    ("positive", 2, 2), ("negative, not positive", 0, 2), ("positive.", 2, UNPARSEABLE),
    ("Positive", 2, UNPARSEABLE), ("", UNPARSEABLE, UNPARSEABLE)])
def test_parse_strict_is_the_originals_last_token_for_nusax(text, first, strict):
    labels = ("negative", "neutral", "positive")
    assert parse_label(text, labels, label_rule("nusax", "first")) == first
    assert parse_label(text, labels, label_rule("nusax", "strict")) == strict
