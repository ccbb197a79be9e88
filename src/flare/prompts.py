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


def parse_label(generated: str, labels: tuple[str, ...]) -> int:
    """Map generated text to a class id: the first word that is a label word (case and punctuation ignored).

    Returns ``UNPARSEABLE`` (-1, always scored wrong and counted) when no word matches.
    """
    for word in re.findall(r"\w+", generated.lower()):
        if word in labels:
            return labels.index(word)
    return UNPARSEABLE


def parse_answer(generated: str) -> str:
    """A generated QA answer: the first line, stripped."""
    return generated.strip().split("\n")[0].strip()
