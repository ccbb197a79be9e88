"""Tokenisation into model features and the one padding collator.

Encoders: the original's single-string classification input; extractive QA windows live in :mod:`flare.qa`.
Decoders: the original's prompt + answer word/text + EOS, loss on the answer and EOS only; prompts that do not fit
are shortened inside their long field (premise, text or context) so the template's tail ("Label: ", "Answer: ")
is never cut off (the original cut the end of the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare.config import TASKS
from flare.prompts import decoder_prompt, encoder_text

IGNORE_INDEX = -100


def encoder_cls_features(examples: dict, task: str, tokenizer, max_length: int) -> dict:
    rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
    enc = tokenizer([encoder_text(task, r) for r in rows], truncation=True, max_length=max_length)
    enc["labels"] = list(examples["label"])
    return enc


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's leading special tokens (BOS) but never a trailing EOS."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def fit_example(task: str, example: dict, tokenizer, budget: int,
                template: str | None = None) -> tuple[dict, list[int], bool]:
    """The example with its long field shortened until its prompt has at most ``budget`` tokens: (example, prompt
    ids, truncated). In the last resort (the template alone is too long) the ids keep the prompt's tail."""
    field = TASKS[task].truncate_field
    example = dict(example)
    ids = _ids(tokenizer, decoder_prompt(task, example, template))
    truncated = False
    for _ in range(4):
        if len(ids) <= budget:
            return example, ids, truncated
        truncated = True
        offsets = tokenizer(example[field], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = max(len(offsets) - (len(ids) - budget) - 2, 0)
        example[field] = example[field][: offsets[keep - 1][1]] if keep > 0 else ""
        ids = _ids(tokenizer, decoder_prompt(task, example, template))
    return example, ids[len(ids) - budget:], True  # last resort: keep the prompt's tail (the template's "Answer: ")


def fit_prompt(task: str, example: dict, tokenizer, budget: int,
               template: str | None = None) -> tuple[list[int], bool]:
    """Prompt ids of at most ``budget`` tokens, shortening the task's long field first; returns (ids, truncated)."""
    _, ids, truncated = fit_example(task, example, tokenizer, budget, template)
    return ids, truncated


MIN_CONTENT_TOKENS = 16  # room a decoder prompt must leave for the example's own text


def check_prompt_fits(task: str, tokenizer, max_length: int) -> None:
    """A decoder's prompt template, the longest label (or an answer) and EOS must leave room for the text; otherwise
    every prompt would be cut into its template ("Label: " lost) and nothing learnt."""
    from flare.errors import UsageError

    info = TASKS[task]
    empty = {f: "" for f in info.text_fields}
    template = len(_ids(tokenizer, decoder_prompt(task, empty)))
    answers = info.labels if info.kind == "cls" else ("an answer of a few words",)
    answer = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
    need = template + answer + MIN_CONTENT_TOKENS
    if max_length < need:
        raise UsageError(f"--max_length {max_length} is too small for the {task} prompt: its template takes "
                         f"{template} tokens and the answer {answer}; use --max_length {need} or more (default "
                         f"{info.max_length})")


def answer_text(task: str, example: dict) -> str:
    info = TASKS[task]
    if info.kind == "cls":
        return info.labels[example["label"]]
    return example["answers"]["text"][0]


def cut_tokens(tokenizer, text: str, n: int) -> str:
    """The prefix of ``text`` that its first ``n`` tokens cover."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= n else (text[: offsets[n - 1][1]] if n > 0 else "")


def decoder_features(examples: dict, task: str, tokenizer, max_length: int, train: bool,
                     template: str | None = None) -> dict:
    """Train: prompt + answer + EOS with labels on answer + EOS. Eval: prompt only."""
    rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
    out = {"input_ids": [], "attention_mask": [], "truncated": []}
    if train:
        out["labels"] = []
    for row in rows:
        answer = tokenizer(answer_text(task, row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt, truncated = fit_prompt(task, row, tokenizer, max_length - len(answer) if train else max_length,
                                       template)
        ids = prompt + answer if train else prompt
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["truncated"].append(truncated)
        if train:
            out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
    return out


@dataclass
class PadCollator:
    """Pads every sequence field of a batch to the batch's longest, on ``padding_side``.

    ``*input_ids`` get ``pad_token_id``, ``*attention_mask``/``*token_type_ids`` 0, ``*labels`` -100; scalar
    fields (class labels, start/end positions) are stacked. Fields with a prefix (``source_input_ids``) are
    padded the same way, each group to its own longest unless ``pad_to_multiple`` says otherwise.
    """

    pad_token_id: int
    padding_side: str = "right"
    keep: tuple[str, ...] | None = None  # keep only these fields (None: all tensor-able fields)
    pad_values: dict | None = None  # per-field pad value overrides (e.g. the MT tokenizer's pad id)

    def _pad_value(self, key: str) -> int:
        if self.pad_values and key in self.pad_values:
            return self.pad_values[key]
        if key.endswith("input_ids"):
            return self.pad_token_id
        if key.endswith("labels"):
            return IGNORE_INDEX
        return 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        keys = [k for k in features[0] if self.keep is None or k in self.keep]
        for key in keys:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                longest = max(len(v) for v in values)
                pad = self._pad_value(key)
                rows = [
                    (list(v) + [pad] * (longest - len(v))) if self.padding_side == "right"
                    else ([pad] * (longest - len(v)) + list(v))
                    for v in values
                ]
                batch[key] = torch.tensor(rows, dtype=torch.long)
            elif isinstance(values[0], (int, bool)) or (hasattr(values[0], "dtype")):
                batch[key] = torch.tensor(values, dtype=torch.long)
        return batch
