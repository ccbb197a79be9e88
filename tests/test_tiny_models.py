"""The tiny models load like hub models and their tokenizers really tokenize."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoTokenizer

from flare.tiny_models import FAMILIES

TEXT = "Premise: Aku seneng banget karo panganane. Label: entailment"


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_and_is_not_unk(tiny_models, family):
    tok = AutoTokenizer.from_pretrained(tiny_models / family)
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert sum(i == tok.unk_token_id for i in ids) == 0
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert len(tok) <= AutoConfig.from_pretrained(tiny_models / family).vocab_size


def test_nllb_language_codes_are_special_tokens(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models / "nllb", src_lang="jav_Latn", tgt_lang="eng_Latn")
    ids = tok("apik tenan")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "jav_Latn"
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(["eng_Latn", "spa_Latn", "sun_Latn", "ind_Latn"])


@pytest.mark.parametrize("family,model_type", [("llama", "llama"), ("gemma2", "gemma2"),
                                               ("xlm-roberta", "xlm-roberta"), ("bert", "bert"), ("nllb", "m2m_100")])
def test_model_types(tiny_models, family, model_type):
    from flare.config import resolve_model

    assert AutoConfig.from_pretrained(tiny_models / family).model_type == model_type
    assert resolve_model(str(tiny_models / family)).model_type == model_type
