"""One Trainer subclass: evaluation runs the task :class:`~flare.evaluation.Evaluator` (argmax, QA spans or
greedy generation) instead of the HF prediction loop, so validation metrics equal test metrics in definition.

With a :class:`~flare.models.fusion.Fusion` (stage 2, FLARE), every training step runs inside
``fusion.source(batch)``: the source pass happens once per step, and the source stays set through ``backward()``
so gradient-checkpointed layers fuse again when they recompute. The fusion modules (cross-attention, FLARE MT
projection) are saved into every checkpoint and reloaded with the best one or on resume.

With an :class:`~flare.models.xmixup.XMixup`, the loss of every training step is X-Mixup's two-pass loss (its gates
are saved and reloaded like the fusion modules); evaluation reads the target alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from flare.evaluation import Evaluator
from flare.files import RUNTIME_FILE, write_json_atomic

logger = logging.getLogger(__name__)


class FlareTrainingArguments(TrainingArguments):
    """TrainingArguments that never use several GPUs from ONE process.

    A plain ``python run.py`` on a node with N visible GPUs makes transformers count ``n_gpu = N``: the batch is
    multiplied by N (N times the intended epochs per step budget on one GPU for 4-bit models, which skip
    DataParallel) and other models are wrapped in ``nn.DataParallel``, whose replicas on GPUs 1..N-1 run FLARE's
    hooks against source states that live on GPU 0. Several GPUs are used through one process per GPU
    (``torchrun`` / ``accelerate launch``: DDP, where transformers' ``n_gpu`` is 1 anyway) or the sweep's
    ``--gpus`` / Slurm launchers; one process uses one device."""

    @property
    def n_gpu(self):
        return min(super().n_gpu, 1)


def is_causal_lm(model) -> bool:
    """A causal LM (its loss sums over tokens and divides by ``num_items_in_batch``), peft-wrapped or not."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def precision_of(args: TrainingArguments) -> str:
    """The arithmetic a run trained in: bf16 / fp16 mixed precision, fp32 with TF32 matmuls (Ampere+), or fp32."""
    if args.bf16:
        return "bf16"
    if args.fp16:
        return "fp16"
    if args.tf32:
        return "tf32"
    return "fp32"


def align_special_tokens(model, tokenizer) -> dict:
    """The model's config (and generation config) take the tokenizer's BOS/EOS/PAD ids, which is what the Trainer
    does at the start of training, there with a warning that reads like a fault (a converted me5-small and our
    pad-less decoders always get it). Returns what changed; ids the config lists (several EOS) are kept."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    changed = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        for config in (c for c in configs if c is not None and value is not None):
            current = getattr(config, name, None)
            if current == value or (isinstance(current, list) and value in current):
                continue
            setattr(config, name, [*current, value] if isinstance(current, list) else value)
            changed[name] = value
    return changed


class FlareTrainer(Trainer):
    """``save_adapters``: the peft adapters a checkpoint holds (stage 2: only the new one, not the frozen stage-1
    adapter under it); None saves every adapter, as Trainer does."""

    def __init__(self, *args, evaluator: Evaluator, fusion=None, source_columns: tuple[str, ...] = (),
                 save_adapters: tuple[str, ...] | None = None, xmixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processing_class is not None and (changed := align_special_tokens(self.model,
                                                                                  self.processing_class)):
            logger.debug("model config takes the tokenizer's special tokens: %s", changed)
        self.evaluator, self.fusion, self.source_columns = evaluator, fusion, tuple(source_columns)
        self.save_adapters = save_adapters
        self.xmixup = xmixup  # X-Mixup (its loss runs the source and the target pass of every training batch)
        self._xmixup_epoch = None
        # the modules saved beside the adapter in every checkpoint and reloaded with it
        self.extra_modules = [m for m in (fusion, xmixup) if m is not None]
        if not is_causal_lm(self.model) or xmixup is not None:
            # A peft model's forward takes **kwargs, so Trainer believes the model normalises its loss by
            # num_items_in_batch across devices and accumulation steps, and scales the loss by the number of
            # processes (and skips dividing it by the accumulation steps). Classification and QA heads ignore
            # num_items_in_batch: their gradients would be world_size (or accumulation_steps) times too large.
            self.model_accepts_loss_kwargs = False

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Training; a resumed run carries the training seconds of its earlier attempts (up to the checkpoint it
        resumes from, recorded there in ``flare_runtime.json``), so ``train_runtime`` is the run's whole cost."""
        self._attempt_start = time.time()
        self._earlier = {"seconds": 0.0, "attempts": 0}
        if isinstance(resume_from_checkpoint, str) and (Path(resume_from_checkpoint) / RUNTIME_FILE).is_file():
            self._earlier = json.loads((Path(resume_from_checkpoint) / RUNTIME_FILE).read_text())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _runtime_so_far(self) -> dict:
        return {"seconds": self._earlier["seconds"] + time.time() - self._attempt_start,
                "attempts": self._earlier["attempts"] + 1}

    def _save_checkpoint(self, model, trial) -> None:
        if self.args.should_save:  # before the Trainer's own files: trainer_state.json, written last, marks it whole
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_json_atomic(folder / RUNTIME_FILE, self._runtime_so_far())
        super()._save_checkpoint(model, trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.xmixup is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        epoch = int(self.state.epoch or 0)  # the λ statistics cover the current (finally: the last) epoch
        if epoch != self._xmixup_epoch:
            self.xmixup.reset_lambda_stats()
            self._xmixup_epoch = epoch
        loss = self.xmixup.loss(model, inputs)  # a mean over the batch: the Trainer scales it for accumulation
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.fusion is None:
            return super().training_step(model, inputs, num_items_in_batch)
        batch = dict(inputs)
        model_inputs = {k: v for k, v in batch.items() if k not in self.source_columns}
        with self.fusion.source(batch):  # forward AND backward (checkpoint recomputation) see the source
            return super().training_step(model, model_inputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        predictions = self.evaluator.predict(self.model)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in self.evaluator.score(predictions).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # the fusion modules live outside peft's adapter state dict: save and load them beside it
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.save_adapters is None:
            super()._save(output_dir, state_dict)
        elif self.args.should_save:  # Trainer._save for a peft model, restricted to the selected adapters
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, selected_adapters=list(self.save_adapters))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.should_save:  # distributed: rank 0 writes
            for extra in self.extra_modules:
                extra.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for extra in self.extra_modules:
            extra.load(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and Path(best).is_dir():
            for extra in self.extra_modules:
                extra.load(best)

    def summary(self, train_out, seconds: float) -> dict:
        """What a finished training run reports in ``results_*.json`` (both stages): runtime (``seconds`` of this
        attempt plus, for a resumed run, those of its earlier attempts up to the checkpoint it resumed from; time
        an interrupted attempt spent after its last checkpoint is not counted), loss, steps, the best checkpoint, and
        the validation metric that chose it (``validation_best``; every validation in ``validation_history`` as
        [step, value]), e.g. to pick a training budget on validation data only."""
        key = self.args.metric_for_best_model
        history = [[int(h["step"]), float(h[key])] for h in self.state.log_history if key in h]
        a = self.args
        global_batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        n_train = len(self.train_dataset) if self.train_dataset is not None else 0
        earlier = getattr(self, "_earlier", {"seconds": 0.0, "attempts": 0})
        return dict(train_runtime=seconds + earlier["seconds"], train_attempts=earlier["attempts"] + 1,
                    train_loss=train_out.training_loss, train_steps=self.state.global_step,
                    world_size=a.world_size, effective_batch_size=global_batch,
                    # passes over the training features actually made: steps x global batch / features
                    epochs_trained=round(self.state.global_step * global_batch / n_train, 4) if n_train else None,
                    precision=precision_of(a),
                    best_checkpoint=self.state.best_model_checkpoint, validation_metric=key,
                    validation_best=self.state.best_metric, validation_history=history)
