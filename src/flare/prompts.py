"""Prompt templates and verbalizers of the original (decoder models), and the encoders' input formats."""

from __future__ import annotations

import re

from flare.metrics import UNPARSEABLE

# the original's decoder prompts; the answer (label word or answer text) + EOS follows directly
TEMPLATES = {
    "xnli": "Premise: {premise}\nHypothesis: {hypothesis}\nLabel: ",
    "nusax": "{text}\nSentiment: ",
    "tydiqa": "Context: {context}\nQuestion: {question}\nAnswer: ",
}


# input-level fusion (stage 2): English source then target, as the original (with the "\n" before "Answer: " that
# its TyDiQA template lacked); ``src_*`` are the English fields
INPUT_FUSION_TEMPLATES = {
    "xnli": ("Premise: {src_premise}\nHypothesis: {src_hypothesis} "
             "Premise: {premise}\nHypothesis: {hypothesis}\nLabel: "),
    "nusax": "{src_text}\n{text}\nSentiment: ",
    "tydiqa": ("Context: {src_context}\nQuestion: {src_question}\n\n"
               "Context: {context}\nQuestion: {question}\nAnswer: "),
}


def decoder_prompt(task: str, example: dict, template: str | None = None) -> str:
    return (template or TEMPLATES[task]).format(**example)


def encoder_text(task: str, example: dict) -> str:
    """The original's single-string encoder input for classification tasks."""
    if task == "xnli":
        return f"Premise: {example['premise']} Hypothesis: {example['hypothesis']}"
    if task == "nusax":
        return example["text"]
    raise ValueError(f"no single-string encoder input for task {task!r}")


# --parse strict: the original's rule per task. XNLI scored exact match of the decoded output against the label word
# (case and punctuation ignored); NusaX mapped the LAST whitespace token of the output through the verbalizer.
STRICT_RULES = {"xnli": "exact", "nusax": "last"}
PARSE_MODES = ("first", "strict")


def parse_label(generated: str, labels: tuple[str, ...], rule: str = "first") -> int:
    """Map generated text to a class id; ``UNPARSEABLE`` (-1, always scored wrong and counted) if it does not parse.

    ``first`` (default, lenient): the first word that is a label word, case and punctuation ignored.
    ``exact`` (the original's XNLI): the whole output, lower-cased and without punctuation, is a label word.
    ``last`` (the original's NusaX): the last whitespace-separated token is a label word, exactly.
    """
    if rule == "first":
        for word in re.findall(r"\w+", generated.lower()):
            if word in labels:
                return labels.index(word)
        return UNPARSEABLE
    if rule == "exact":
        text = re.sub(r"[^\w\s]", "", generated.lower()).strip()
        return labels.index(text) if text in labels else UNPARSEABLE
    if rule == "last":
        tokens = generated.split()
        return labels.index(tokens[-1]) if tokens and tokens[-1] in labels else UNPARSEABLE
    raise ValueError(f"unknown label parsing rule {rule!r}")


def label_rule(task: str, parse: str) -> str:
    """The :func:`parse_label` rule for ``--parse`` (first | strict) on ``task``."""
    if parse not in PARSE_MODES:
        raise ValueError(f"--parse {parse!r}: choose one of {', '.join(PARSE_MODES)}")
    return STRICT_RULES[task] if parse == "strict" else "first"


def parse_answer(generated: str) -> str:
    """A generated QA answer: the first line, stripped."""
    return generated.strip().split("\n")[0].strip()
