"""Tiny random models with WORKING tokenizers, for tests and quick smoke runs.

``python -m flare.tiny_models OUT_DIR`` writes ``OUT_DIR/{llama,gemma2,xlm-roberta,bert,nllb}`` (and, with
``--families``, the newer ``qwen3``, ``gemma3_text``, ``phi3``, ``mistral``, ``xlm-roberta-xl``): each a normal
Hugging Face model directory (config + safetensors + tokenizer) that ``from_pretrained`` and ``--plm OUT_DIR/llama``
load like any hub model. The tokenizers are SentencePiece unigram models trained on the shipped multilingual data
(NusaX, XNLI, TyDiQA), saved in each family's own tokenizer class with its special-token conventions; the NLLB one
has every NLLB language code of :mod:`flare.languages` registered as a special token.

Why not ``Tokenizer(vocab_file=...)``: in transformers 5 that silently yields an all-``<unk>`` tokenizer; loading the
folder with ``from_pretrained`` is what works (a test checks a known string round-trips).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "gemma2", "xlm-roberta", "bert", "nllb")
# newer families (one tiny test each, tests/test_families.py); their tokenizers reuse a convention above
EXTRA_FAMILIES = ("qwen3", "gemma3_text", "phi3", "mistral", "xlm-roberta-xl")
DECODERS = ("llama", "gemma2", "qwen3", "gemma3_text", "phi3", "mistral")
# which tokenizer (class + SentencePiece convention) a family's tiny model uses
TOKENIZER_OF = {"qwen3": "llama", "phi3": "llama", "mistral": "llama", "gemma3_text": "gemma2",
                "xlm-roberta-xl": "xlm-roberta"}
VOCAB_SIZE = 4000
WIDTH = 64  # bitsandbytes CPU 4-bit kernels need in_features >= 64 and out_features % 32 == 0
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 1024

# SentencePiece special ids per convention (the piece ids the HF tokenizer classes expect)
_SPM_CONVENTIONS = {
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
    "fairseq": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),  # XLM-R / NLLB: HF adds the fairseq offset
}


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "data"


def corpus_texts(data_dir: Path) -> list[str]:
    """Multilingual text from the shipped data: NusaX train (all languages), XNLI dev, TyDiQA questions/contexts."""
    texts: list[str] = []
    for path in sorted((data_dir / "nusax").glob("*/train.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            texts += [row["text"] for row in csv.DictReader(f)]
    for path in sorted((data_dir / "xnli").glob("dev-*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += line.split("\t")[:2]
    for path in sorted((data_dir / "tydiqa").glob("*/*.json")):
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                texts.append(para["context"])
                texts += [qa["question"] for qa in para["qas"]]
    if not texts:
        raise FileNotFoundError(f"no training text found under {data_dir} (expected the repository's data/ folder)")
    # prompt words of the task templates must not be <unk>
    texts += ["Premise: Hypothesis: Label: Sentiment: Context: Question: Answer:"] * 50
    texts += ["entailment neutral contradiction negative positive"] * 50
    return texts


def train_spm(texts: list[str], convention: str, out_file: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size, model_type="unigram",
            character_coverage=0.9995, byte_fallback=False, num_threads=2, minloglevel=2,
            input_sentence_size=200_000, shuffle_input_sentence=True, **_SPM_CONVENTIONS[convention],
        )
        shutil.copy(Path(tmp) / "sp.model", out_file)
    return out_file


def _tokenizer(family: str, spm_files: dict[str, Path], out: Path):
    from transformers import GemmaTokenizer, LlamaTokenizer, NllbTokenizer, XLMRobertaTokenizer

    from flare.languages import LANGUAGES

    family = TOKENIZER_OF.get(family, family)
    cls, file_name, convention, kwargs = {
        "llama": (LlamaTokenizer, "tokenizer.model", "llama", {"pad_token": "<unk>"}),
        "gemma2": (GemmaTokenizer, "tokenizer.model", "gemma", {}),
        "xlm-roberta": (XLMRobertaTokenizer, "sentencepiece.bpe.model", "fairseq", {}),
        "bert": (XLMRobertaTokenizer, "sentencepiece.bpe.model", "fairseq", {}),
        "nllb": (NllbTokenizer, "sentencepiece.bpe.model", "fairseq", {
            "additional_special_tokens": sorted({lang.nllb for lang in LANGUAGES.values() if lang.nllb})}),
    }[family]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_files[convention], out / file_name)
    tok = cls.from_pretrained(out, **kwargs)
    if family == "llama":
        # Llama-3 style: no pad token of its own; a reserved token serves as pad (no embedding resize needed)
        tok.pad_token = tok.unk_token
    tok.save_pretrained(out)
    return tok


def _config(family: str, tok):
    from transformers import (
        BertConfig,
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        M2M100Config,
        MistralConfig,
        Phi3Config,
        Qwen3Config,
        XLMRobertaConfig,
        XLMRobertaXLConfig,
    )

    vocab = len(tok)
    common = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family in ("qwen3", "mistral", "phi3"):
        cls = {"qwen3": Qwen3Config, "mistral": MistralConfig, "phi3": Phi3Config}[family]
        extra = dict(head_dim=WIDTH // HEADS) if family == "qwen3" else {}
        return cls(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                   tie_word_embeddings=False, **extra, **special, **common)
    if family == "gemma3_text":
        return Gemma3TextConfig(vocab_size=vocab, num_key_value_heads=2, head_dim=WIDTH // HEADS,
                                max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS,
                                attn_implementation="eager", **special, **common)
    if family == "xlm-roberta-xl":
        return XLMRobertaXLConfig(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1,
                                  **special, **common)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **common)
    if family == "gemma2":
        return Gemma2Config(vocab_size=vocab, num_key_value_heads=2, head_dim=WIDTH // HEADS,
                            max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, attn_implementation="eager", **common)
    if family == "xlm-roberta":
        return XLMRobertaConfig(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, **common)
    if family == "bert":
        return BertConfig(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, type_vocab_size=2,
                          pad_token_id=tok.pad_token_id, tokenizer_class="XLMRobertaTokenizer", **common)
    return M2M100Config(vocab_size=vocab, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=2 * WIDTH,
                        decoder_ffn_dim=2 * WIDTH, max_position_embeddings=MAX_POSITIONS,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, tokenizer_class="NllbTokenizer")


def _model(family: str, config):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
    )

    if family in DECODERS:
        return AutoModelForCausalLM.from_config(config)
    if family == "nllb":
        return AutoModelForSeq2SeqLM.from_config(config)
    return AutoModelForMaskedLM.from_config(config)  # like the hub checkpoints of XLM-R / BERT: no task head


def write_tiny_models(out_dir: str | Path, data_dir: str | Path | None = None,
                      families: tuple[str, ...] = FAMILIES, seed: int = 0) -> dict[str, Path]:
    """Write tiny random models with trained tokenizers; returns ``{family: model_dir}``."""
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    unknown = [f for f in families if f not in FAMILIES + EXTRA_FAMILIES]
    if unknown:
        raise ValueError(f"unknown tiny model families {unknown}; choose from {FAMILIES + EXTRA_FAMILIES}")
    texts = corpus_texts(data_dir)
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        conventions = {"llama": "llama", "gemma2": "gemma"}
        needed = {conventions.get(TOKENIZER_OF.get(f, f), "fairseq") for f in families}
        spm_files = {c: train_spm(texts, c, Path(tmp) / f"{c}.model") for c in sorted(needed)}
        for family in families:
            torch.manual_seed(seed)
            target = out_dir / family
            tok = _tokenizer(family, spm_files, target)
            model = _model(family, _config(family, tok))
            model.save_pretrained(target)
            paths[family] = target
            logger.info("wrote tiny %s to %s (%d parameters, vocab %d)", family, target,
                        sum(p.numel() for p in model.parameters()), len(tok))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the tiny models into (one subfolder per family)")
    parser.add_argument("--data_dir", default=None, help="data folder to train the tokenizers on (default: data/)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES + EXTRA_FAMILIES,
                        help="which models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_tiny_models(args.out_dir, args.data_dir, tuple(args.families))
    for family, path in paths.items():
        print(f"{family}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
