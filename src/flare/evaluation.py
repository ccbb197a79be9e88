"""Prediction and scoring for every task x model family, shared by stage 1 and stage 2.

An :class:`Evaluator` owns one evaluation set: the raw examples (for gold answers and QA post-processing) and
their model features. ``predict(model)`` runs the model (argmax, QA spans or greedy generation) and returns one
prediction per example; ``score(predictions)`` gives the metrics; ``records(predictions)`` the JSONL lines.
Batches are formed longest first (little padding: about half the compute on NusaX) and predictions are put back in
the examples' order. Under DDP (``torchrun``), rank r runs batches r, r + N, r + 2N, ... of that order and the
per-batch outputs are gathered on every rank: each example is evaluated once, every rank ends with the same
predictions (so the same metrics and the same best checkpoint), and they equal a one-process run's, batch for batch.

Decoders classify by greedy generation (``eval_mode="generate"``, the original) or by ``eval_mode="score"``: the
label words ranked by their log-likelihood after the prompt (the sum over a label's tokens, as the training
tokenised it). If every label word is one token, that is ONE forward pass per batch that computes the logits of
the last position only; otherwise one teacher-forced pass per label word, aligned for fusion exactly as training.

``batch_context`` lets stage 2 wrap every model call (e.g. to set the fusion source for the batch): it receives the
whole batch, including the ``extra_columns`` (``src_*``/``mt_*`` source inputs) that are not passed to the model.
Stage 1 passes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import datasets
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from flare import qa
from flare.config import TASKS, ModelSpec
from flare.data.features import PadCollator, decoder_features, encoder_cls_features
from flare.metrics import classification_metrics, qa_metrics
from flare.prompts import label_rule, parse_answer, parse_label

logger = logging.getLogger(__name__)

BatchContext = Callable[[dict], contextlib.AbstractContextManager]
EVAL_MODES = ("generate", "score")


def _no_context(batch: dict) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def shard() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) in a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Evaluator:
    def __init__(self, task: str, spec: ModelSpec, tokenizer, examples: datasets.Dataset, max_length: int,
                 batch_size: int = 32, doc_stride: int = 128, max_answer_length: int = 30,
                 generate_max_tokens: int = 100, features: datasets.Dataset | None = None,
                 batch_context: BatchContext | None = None, extra_columns: tuple[str, ...] = (),
                 pad_values: dict | None = None, parse: str = "first", eval_mode: str = "generate",
                 autocast: torch.dtype | None = None):
        self.task, self.info, self.spec, self.tokenizer = task, TASKS[task], spec, tokenizer
        # --bf16 / --fp16: every forward (and generate(), and a FLARE source pass in batch_context) under the
        # autocast training uses; the Trainer's autocast reaches the wrapped model's forward only, not generate()
        self.autocast = autocast
        self.label_rule = label_rule(task, parse) if self.info.kind == "cls" else None
        self.outputs: list[str] | None = None  # decoders: the raw generated texts of the last predict()
        self.batches_run: int | None = None  # batches this process ran in the last predict() (its DDP share)
        self.processes: int | None = None  # processes the last predict() was sharded across
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"--eval_mode {eval_mode!r}: choose one of {', '.join(EVAL_MODES)}")
        if eval_mode == "score" and (spec.family != "decoder" or self.info.kind != "cls"):
            raise ValueError("--eval_mode score ranks label words: decoders on classification tasks only")
        self.eval_mode = eval_mode
        self.label_ids = ([tokenizer(w, add_special_tokens=False)["input_ids"] for w in self.info.labels]
                          if self.info.kind == "cls" else [])
        self.examples, self.max_length, self.batch_size = examples, max_length, batch_size
        self.doc_stride, self.max_answer_length = doc_stride, max_answer_length
        self.batch_context = batch_context or _no_context
        self.extra_columns, self.pad_values = tuple(extra_columns), pad_values
        if self.info.kind == "cls":
            # room for the longest label word and EOS; longer generations cannot change the parsed label
            self.max_new_tokens = min(generate_max_tokens, max(len(ids) for ids in self.label_ids) + 2)
        else:
            self.max_new_tokens = generate_max_tokens
        self.features = features if features is not None else self.build_features(examples)
        # feature indices, longest input first (stable): batches of similar length waste little on padding
        self.order = np.argsort(-np.array([len(ids) for ids in self.features["input_ids"]]), kind="stable")
        self._back = np.argsort(self.order)  # position of each feature in that order

    # ------------------------------------------------------------------ features
    def build_features(self, examples: datasets.Dataset) -> datasets.Dataset:
        tok, task, ml = self.tokenizer, self.task, self.max_length
        if self.spec.family == "decoder":
            fn = lambda b: decoder_features(b, task, tok, ml, train=False)  # noqa: E731
        elif self.info.kind == "cls":
            fn = lambda b: encoder_cls_features(b, task, tok, ml)  # noqa: E731
        else:
            fn = lambda b: qa.prepare_eval_features(b, tok, ml, self.doc_stride)  # noqa: E731
        return examples.map(fn, batched=True, remove_columns=examples.column_names, desc="eval features")

    def model_inputs(self) -> tuple[str, ...]:
        return tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in self.features.column_names)

    def batches(self, columns: tuple[str, ...] | None = None, numbers=None):
        """Padded batches of the features in ``self.order`` (only the batches ``numbers``, if given)."""
        columns = columns or self.model_inputs() + self.extra_columns
        collate = PadCollator(self.tokenizer.pad_token_id, self.tokenizer.padding_side, keep=columns,
                              pad_values=self.pad_values)
        for number in range(self._n_batches()) if numbers is None else numbers:
            start = number * self.batch_size
            rows = self.features.select(self.order[start:start + self.batch_size])
            yield collate([{c: r[c] for c in columns} for r in rows])

    def _map_batches(self, model, step: Callable[[dict], list], desc: str) -> list:
        """``step(batch)`` (the batch on the model's device) for every batch, in batch order; under DDP each rank
        runs its share (batches rank, rank + N, ...) and every rank receives all outputs. ``step`` returns one entry
        per row of its batch; the result is the concatenation, in ``self.order``."""
        rank, world = shard()
        device = self._device(model)
        mine = range(rank, self._n_batches(), world)
        self.batches_run, self.processes = len(mine), world
        outputs = {}
        for number, batch in zip(mine, tqdm(self.batches(numbers=mine), desc=desc, leave=False, total=len(mine),
                                            disable=rank != 0)):
            outputs[number] = step({k: v.to(device) for k, v in batch.items()})
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, outputs)
            outputs = {n: out for share in shares for n, out in share.items()}
        return [row for n in range(self._n_batches()) for row in outputs[n]]

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, model) -> list:
        was_training = model.training
        model.eval()
        precision = (torch.autocast(device_type=self._device(model).type, dtype=self.autocast) if self.autocast
                     else contextlib.nullcontext())
        try:
            with precision:
                return self._predict(model)
        finally:
            model.train(was_training)

    def _predict(self, model) -> list:
        if self.eval_mode == "score":
            return self._score_labels(model)
        if self.spec.family == "decoder":
            return self._generate(model)
        if self.info.kind == "cls":
            return self._classify(model)
        return self._extract(model)

    def _device(self, model) -> torch.device:
        return next(p.device for p in model.parameters())

    def _inputs(self, batch: dict) -> dict:
        """The model's own inputs of a batch (the extra source columns go to ``batch_context`` only)."""
        return {k: v for k, v in batch.items() if k not in self.extra_columns}

    def _classify(self, model) -> list[int]:
        def step(batch):
            with self.batch_context(batch):
                return model(**self._inputs(batch)).logits.argmax(-1).tolist()

        preds = self._map_batches(model, step, "eval")
        return [preds[k] for k in self._back]  # back to feature order

    def _extract(self, model) -> list[str]:
        def step(batch):  # rows of (start logits, end logits), padded to max_length
            with self.batch_context(batch):
                out = model(**self._inputs(batch))
            padded = []
            for logits in (out.start_logits, out.end_logits):
                p = torch.full((logits.shape[0], self.max_length), -1e9, dtype=torch.float32)
                p[:, : logits.shape[1]] = logits.float().cpu()
                padded.append(p.numpy())
            return list(zip(*padded))

        rows = self._map_batches(model, step, "eval")
        starts, ends = (np.stack([r[i] for r in rows]) if rows else np.zeros((0, self.max_length), np.float32)
                        for i in (0, 1))
        # rows back to feature order
        by_id = qa.postprocess_predictions(self.examples, self.features, starts[self._back], ends[self._back],
                                           max_answer_length=self.max_answer_length)
        return [by_id[i] for i in self.examples["id"]]

    def _generate(self, model) -> list:
        tok = self.tokenizer

        def step(batch):
            with self.batch_context(batch):
                generated = model.generate(
                    **self._inputs(batch), max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            new_tokens = generated[:, batch["input_ids"].shape[1]:]  # left padding: the prompt ends at the same column
            return tok.batch_decode(new_tokens, skip_special_tokens=True)

        outputs = self._map_batches(model, step, "generate")
        outputs = [outputs[k] for k in self._back]  # back to feature order
        self.outputs = outputs
        if self.info.kind == "cls":
            return [parse_label(text, self.info.labels, self.label_rule) for text in outputs]
        return [parse_answer(text) for text in outputs]

    def label_scores(self, model, batch: dict) -> torch.Tensor:
        """(B, n_labels) log-likelihood of each label word after each (left-padded) prompt of ``batch``."""
        inputs = self._inputs(batch)
        if all(len(ids) == 1 for ids in self.label_ids):  # one pass; the logits of the last position only
            with self.batch_context(batch):
                logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V)
            return logits.log_softmax(-1)[:, [ids[0] for ids in self.label_ids]]
        scores = []
        for ids in self.label_ids:  # teacher-forced: prompt + label word, as in training (without its EOS)
            n, b = len(ids), inputs["input_ids"].shape[0]
            label = torch.tensor(ids, device=inputs["input_ids"].device).expand(b, n)
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], label], 1),
                        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(label)], 1))
            labels = torch.cat([torch.full_like(inputs["input_ids"], -100), label], 1)
            with self.batch_context(dict(batch, **full, labels=labels)):
                logits = model(**full, logits_to_keep=n + 1).logits[:, :-1].float()  # (B, n, V): predict the label
            scores.append(logits.log_softmax(-1).gather(-1, label[..., None]).squeeze(-1).sum(-1))
        return torch.stack(scores, -1)

    def _score_labels(self, model) -> list[int]:
        preds = self._map_batches(model, lambda batch: self.label_scores(model, batch).argmax(-1).tolist(), "score")
        self.outputs = None
        return [preds[k] for k in self._back]

    def _n_batches(self) -> int:
        return (len(self.features) + self.batch_size - 1) // self.batch_size

    # ------------------------------------------------------------------ score
    def golds(self) -> list:
        if self.info.kind == "cls":
            return list(self.examples["label"])
        return [list(a["text"]) for a in self.examples["answers"]]

    def score(self, predictions: list) -> dict[str, float]:
        if self.info.kind == "cls":
            return classification_metrics(predictions, self.golds(), len(self.info.labels))
        return qa_metrics(predictions, self.golds())

    def records(self, predictions: list) -> list[dict]:
        """One JSONL line per example: ``id``, ``prediction``, ``gold``; decoders add ``output``, the raw generated
        text (so an unparseable answer can be read)."""
        ids = self.examples["id"] if "id" in self.examples.column_names else range(len(self.examples))
        rows = [{"id": str(i), "prediction": p, "gold": g} for i, p, g in zip(ids, predictions, self.golds())]
        if self.spec.family == "decoder" and self.outputs is not None and len(self.outputs) == len(rows):
            for row, text in zip(rows, self.outputs):
                row["output"] = text
        return rows
