"""A log a newcomer can read: expected messages that look like faults are replaced by one line in our words, or
dropped; real mismatches still warn."""

from __future__ import annotations

import logging
import warnings

from flare.common_args import setup_logging
from flare.config import resolve_model
from flare.models.loading import load_model, load_tokenizer, report_loading
from flare.trainer import align_special_tokens


def test_loading_says_once_what_is_new_instead_of_the_load_report(tiny_models, caplog):
    spec = resolve_model(str(tiny_models / "xlm-roberta"))
    with caplog.at_level(logging.INFO):
        load_model(spec, "nusax", quantize="none", device="cpu", bf16=False)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "flare.models.loading"]
    assert "task head classifier newly initialised" in line and "pretraining head lm_head not used" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # the filter is gone after loading: transformers' other warnings still come through
    assert not logging.getLogger("transformers.modeling_utils").filters


def test_a_checkpoint_that_does_not_fit_outside_the_head_still_warns(tiny_models, caplog):
    spec = resolve_model(str(tiny_models / "xlm-roberta"))
    info = {"missing_keys": ["classifier.dense.weight", "roberta.encoder.layer.0.attention.self.query.weight"],
            "unexpected_keys": ["lm_head.bias", "roberta.extra.weight"], "mismatched_keys": []}
    with caplog.at_level(logging.INFO):
        report_loading(spec, "cls", info)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "layer.0.attention.self.query.weight" in warning and "roberta.extra.weight" in warning
    assert "classifier" not in warning and "lm_head" not in warning


def test_special_tokens_are_aligned_before_the_trainer_would_warn(tiny_models, caplog):
    spec = resolve_model(str(tiny_models / "llama"))
    tok = load_tokenizer(spec)
    with caplog.at_level(logging.INFO):
        model = load_model(spec, "nusax", quantize="none", device="cpu", bf16=False)
    # a decoder's lm_head is pretrained, not a new head: nothing to report
    assert not [r for r in caplog.records if r.name == "flare.models.loading" and "head" in r.getMessage()]
    model.config.pad_token_id = None
    changed = align_special_tokens(model, tok)
    assert changed["pad_token_id"] == tok.pad_token_id == model.config.pad_token_id
    assert align_special_tokens(model, tok) == {}  # nothing left for the Trainer to change (and warn about)
    model.generation_config.eos_token_id = [tok.eos_token_id + 1]  # several EOS ids: kept, the tokenizer's added
    align_special_tokens(model, tok)
    assert model.generation_config.eos_token_id == [tok.eos_token_id + 1, tok.eos_token_id]


def test_expected_library_notices_are_dropped_and_others_kept(caplog):
    setup_logging()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
                    "Please make sure you already `pip install kernels`")
        bnb.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        setup_logging()
        warnings.warn("`is_gradient_checkpointing` is deprecated (v6).", FutureWarning, stacklevel=1)
        warnings.warn("a real deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real deprecation"]


def test_a_4bit_model_with_gradient_checkpointing_loads_without_deprecation_warnings(tiny_models):
    """Seen on the first GPU check: peft's prepare_model_for_kbit_training switched checkpointing on through
    transformers' deprecated gradient_checkpointing_enable (a FutureWarning in every 4-bit run with
    --gradient_checkpointing); the loader switches it on itself, non-reentrant, as for unquantised models."""
    spec = resolve_model(str(tiny_models / "llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(spec, "nusax", quantize="4bit", device="cpu", bf16=False, gradient_checkpointing=True)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert model.is_activation_checkpointing
