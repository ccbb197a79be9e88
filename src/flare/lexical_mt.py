"""A word-level statistical MT system trained on a parallel TRAINING split: ``run_translate.py --model lexical``.

It stands in for NLLB where no NLLB weights can be reached (this project's offline study): weak, but real MT whose
errors are not the human translation's. NusaX is parallel (the same ids in every language), so for a direction
``src -> tgt`` the training pairs are the two languages' TRAINING rows of the same id; the model never reads a
validation or test sentence, whatever split it is asked to translate. The training split it translates is therefore
in-sample for the MT model (its scores there are optimistic), the validation and test splits are not.

Model: IBM Model 1 (``nltk.translate.IBMModel1``, EM over the training pairs) gives t(f | e), the probability of the
source word f given the target word e. Decoding, word by word: each source word f becomes
``argmax_e t(f | e) * p(e)`` (p = unigram frequency of e on the target side of the training pairs; the noisy-channel
rule at the word level), among target WORDS only; punctuation is kept as it is and a word the model never saw is
copied. Ties go to the alphabetically first word, so the output is a deterministic function of the training data.
Text is lower-cased for the model; the output's first letter is capitalised and punctuation re-attached.

MT quality levels between the human translation and this MT (``--model lexical-qNN``, NN in 1..99): NN % of the
rows take the lexical translation, the others the human one, a row chosen by a seeded hash of its id
(:func:`takes_lexical`), so the levels are nested (a row lexical at q25 is lexical at q50 and q75) and reproducible.
The rows' quality is then measured like the lexical MT's own (chrF against the human translation, per split).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

ITERATIONS = 5  # EM iterations of IBM Model 1 (chrF on NusaX test stops improving after about 5)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_NO_SPACE_BEFORE = set(".,!?;:%)]}'\"")
_NO_SPACE_AFTER = set("([{@#")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN.findall(text.lower())


def is_word(token: str) -> bool:
    return bool(token) and (token[0].isalnum() or token[0] == "_")


def detokenize(tokens: list[str]) -> str:
    out = ""
    for tok in tokens:
        if out and tok not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out += " "
        out += tok
    return out[:1].upper() + out[1:]


@dataclass
class LexicalTranslator:
    """Trained on ``(source sentence, target sentence)`` pairs; translates source-language text word by word."""

    source: list[str]
    target: list[str]
    iterations: int = ITERATIONS
    lexicon: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        from nltk.translate import AlignedSent, IBMModel1

        if len(self.source) != len(self.target) or not self.source:
            raise ValueError("the lexical MT needs the same, non-zero number of source and target sentences")
        # nltk's direction: t(words | mots); the source sentence is ``words``, the target sentence ``mots``
        bitext = [AlignedSent(tokenize(s), tokenize(t)) for s, t in zip(self.source, self.target)]
        model = IBMModel1(bitext, self.iterations)
        prior = Counter(tok for t in self.target for tok in tokenize(t) if is_word(tok))
        self.lexicon = {}
        for f, row in model.translation_table.items():
            if not is_word(f):
                continue  # punctuation is kept as it is
            # (-score, e): the highest t(f|e) p(e), ties to the alphabetically first e
            scored = [(-p * prior[e], e) for e, p in row.items() if e is not None and prior[e]]
            if scored:
                self.lexicon[f] = min(scored)[1]
        self.source_vocabulary = len({tok for s in self.source for tok in tokenize(s) if is_word(tok)})
        self.target_vocabulary = len(prior)

    def translate_text(self, text: str) -> str:
        return detokenize([self.lexicon.get(tok, tok) for tok in tokenize(text)])

    def translate(self, texts: list[str]) -> list[str]:
        return [self.translate_text(t) if t.strip() else "" for t in texts]

    def describe(self) -> dict:
        return dict(model="IBM Model 1 (nltk.translate.IBMModel1)", iterations=self.iterations,
                    decoding="argmax_e t(f|e) p(e) per source word; punctuation kept; unknown words copied",
                    training_pairs=len(self.source), source_vocabulary=self.source_vocabulary,
                    target_vocabulary=self.target_vocabulary, lexicon_entries=len(self.lexicon))


def scores(hypotheses: list[str], references: list[str]) -> dict:
    """chrF and BLEU (sacrebleu, corpus level) against the human translation."""
    import sacrebleu

    return dict(chrf=round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
                bleu=round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2))


OFFLINE_MT = ("reference", "lexical")  # translation backends without NLLB weights
_MIX = re.compile(r"lexical-q([1-9][0-9]?)")
MIX_SEED = "flare-mt-quality"


def is_offline_mt(model: str) -> bool:
    """'reference', 'lexical' or a quality level 'lexical-qNN' (no NLLB model)."""
    return model in OFFLINE_MT or mix_fraction(model) is not None


def mix_fraction(model: str) -> float | None:
    """The fraction of rows translated by the lexical MT in ``lexical-qNN`` (NN / 100), else None."""
    match = _MIX.fullmatch(model)
    return int(match.group(1)) / 100 if match else None


def takes_lexical(row_id: str, fraction: float) -> bool:
    """Whether the row ``row_id`` takes the lexical translation at level ``fraction``: a fixed pseudo-random number
    in [0, 1) per id (SHA-256 of a fixed seed and the id) below ``fraction``; nested across levels."""
    digest = hashlib.sha256(f"{MIX_SEED}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
