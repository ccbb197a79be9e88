"""Stage 1: LoRA fine-tuning of a pretrained model on (English) task data. Entry point: ``run_task_ft.py``.

Writes ``{output_dir}/{task}-{lang}-{plm}-{seed}/``: the adapter and head weights (``adapter_model.safetensors``),
``run_config.json``, ``results_test.json``, ``predictions_test.jsonl`` and bounded ``checkpoint-*`` folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flare.common_args import (
    UsageError,
    add_common_args,
    check_bf16,
    check_eval_mode,
    fail,
    resolve_device,
)
from flare.config import TASKS, ModelSpec, model_name, resolve_model
from flare.data import check_task_language, load_task
from flare.files import write_json_atomic, write_jsonl_atomic

logger = logging.getLogger("flare.run_task_ft")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 1 of FLARE: LoRA fine-tuning on English task data.")
    add_common_args(p)
    p.add_argument("--lang", default="en", help="language of the task data (default en)")
    p.add_argument("--train_split", default="train", choices=["train", "validation"],
                   help="split to train on; 'validation' lets a local XNLI run train on dev-en (no local train set)")
    p.add_argument("--load_ckpt", default=None, help="a run directory of this script: evaluate or continue it")
    return p


@dataclass(frozen=True)
class Stage1Config:
    """Everything a run needs, resolved and validated once from the flags (no model is loaded before this)."""

    task: str
    lang: str
    spec: ModelSpec
    plm: str
    plm_name: str
    seed: int
    device: str
    quantize: str
    max_length: int
    optim: str
    target_modules: tuple[str, ...]
    run_name: str
    run_dir: Path
    load_ckpt: Path | None
    args: dict

    def describe(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("spec", "args")}
        out["run_dir"] = str(self.run_dir)
        out["load_ckpt"] = str(self.load_ckpt) if self.load_ckpt else None
        out["hub_id"], out["family"], out["model_type"] = self.spec.hub_id, self.spec.family, self.spec.model_type
        return out


def resolve_config(args: argparse.Namespace) -> Stage1Config:
    """Validate every flag and derive the run's settings; raises :class:`UsageError`/``ValueError``."""
    spec = resolve_model(args.plm)
    if spec.family == "seq2seq":
        raise UsageError(f"--plm {args.plm} is a translation model; use it with run_translate.py --model")
    lang = check_task_language(args.task, args.lang)
    if args.adapter != "lora":
        raise UsageError(f"--adapter {args.adapter!r} is not supported; the only adapter is 'lora'")
    check_eval_mode(args.eval_mode, spec.family, args.task)
    device = resolve_device(args.device)
    check_bf16(args.bf16, device)
    quantize = args.quantize or spec.quantize
    if quantize != "none" and spec.family == "encoder":
        kind = TASKS[args.task].kind
        if not spec.head_modules(kind):
            raise UsageError(f"--quantize {quantize}: the {kind} head of {args.plm} is not known, so it would be "
                             "quantised too; use --quantize none")
    for name in ("lora_r", "lora_alpha", "batch_size", "epochs", "num_evals"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive")
    load_ckpt = None
    if args.load_ckpt:
        from flare.models.loading import read_run_config

        load_ckpt = Path(args.load_ckpt)
        if not load_ckpt.is_dir():
            raise UsageError(f"--load_ckpt {load_ckpt}: no such run directory")
        saved = read_run_config(load_ckpt)
        if saved.get("task") != args.task or saved.get("plm_name") != model_name(args.plm):
            raise UsageError(f"--load_ckpt {load_ckpt} was trained for task {saved.get('task')!r} with model "
                             f"{saved.get('plm_name')!r}, not {args.task!r} with {model_name(args.plm)!r}")
    plm_name = model_name(args.plm)
    run_name = f"{args.task}-{lang}-{plm_name}-{args.seed}"
    optim = args.optim or ("adamw_bnb_8bit" if quantize != "none" and device == "cuda" else "adamw_torch")
    return Stage1Config(
        task=args.task, lang=lang, spec=spec, plm=args.plm, plm_name=plm_name, seed=args.seed, device=device,
        quantize=quantize, max_length=args.max_length or TASKS[args.task].max_length, optim=optim,
        target_modules=tuple(args.target_modules or spec.lora_targets), run_name=run_name,
        run_dir=Path(args.output_dir) / run_name, load_ckpt=load_ckpt, args=vars(args).copy(),
    )


def _limit(ds, n: int | None):
    return ds.select(range(min(n, len(ds)))) if n else ds


def train_features(task: str, spec: ModelSpec, tokenizer, examples, max_length: int, doc_stride: int):
    """Training features and the label field names the Trainer should use."""
    from flare import qa
    from flare.data.features import decoder_features, encoder_cls_features

    if spec.family == "decoder":
        fn, labels = (lambda b: decoder_features(b, task, tokenizer, max_length, train=True)), ("labels",)
    elif TASKS[task].kind == "cls":
        fn, labels = (lambda b: encoder_cls_features(b, task, tokenizer, max_length)), ("labels",)
    else:
        fn = lambda b: qa.prepare_train_features(b, tokenizer, max_length, doc_stride)  # noqa: E731
        labels = ("start_positions", "end_positions")
    feats = examples.map(fn, batched=True, remove_columns=examples.column_names, desc="train features")
    return feats, labels


class TrainingRun(Protocol):
    """What :func:`training_arguments` reads from a run's config: :class:`Stage1Config` and ``Stage2Config`` both."""

    run_dir: Path
    run_name: str
    seed: int
    device: str
    optim: str
    args: dict


def training_arguments(cfg: TrainingRun, n_train: int, label_names: tuple[str, ...], best_metric: str):
    from transformers import TrainingArguments

    a = cfg.args
    batch_size = min(a["batch_size"], n_train)
    max_steps = a["max_steps"] or max(n_train * a["epochs"] // batch_size // a["gradient_accumulation_steps"], 1)
    eval_steps = max(max_steps // a["num_evals"], 1)
    return TrainingArguments(
        output_dir=str(cfg.run_dir), run_name=cfg.run_name, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=a["gradient_accumulation_steps"], learning_rate=a["lr"],
        lr_scheduler_type="linear", warmup_steps=int(0.1 * max_steps), max_steps=max_steps,
        eval_strategy="steps", save_strategy="steps", eval_steps=eval_steps, save_steps=eval_steps,
        logging_steps=max(max_steps // 100, 1), logging_first_step=True,
        load_best_model_at_end=True, metric_for_best_model=f"eval_{best_metric}", greater_is_better=True,
        save_total_limit=a["save_total_limit"], report_to=[] if a["report_to"] == "none" else [a["report_to"]],
        bf16=a["bf16"], optim=cfg.optim, use_cpu=cfg.device == "cpu", label_names=list(label_names),
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if a["group_by_length"] else "random",
        gradient_checkpointing=False,  # enabled on the model itself (non-reentrant) when asked
    )


def run(cfg: Stage1Config) -> dict:
    from transformers import set_seed

    from flare.data.features import PadCollator
    from flare.evaluation import Evaluator
    from flare.models.loading import (
        add_lora,
        count_parameters,
        load_checked,
        load_model,
        load_tokenizer,
        lora_config,
        save_adapter,
    )
    from flare.trainer import FlareTrainer

    a, info = cfg.args, TASKS[cfg.task]
    if a["report_to"] == "wandb":
        os.environ.setdefault("WANDB_PROJECT", a["wandb_project"])
    set_seed(cfg.seed)
    # data first: a missing file or split fails before any model is loaded
    try:
        train_ds = None if a["eval_only"] else _limit(load_task(cfg.task, cfg.lang, a["train_split"],
                                                                a["data_dir"]), a["max_train_samples"])
        val_ds = _limit(load_task(cfg.task, cfg.lang, "validation", a["data_dir"]), a["max_eval_samples"])
        test_ds = _limit(load_task(cfg.task, cfg.lang, "test", a["data_dir"]), a["max_eval_samples"])
    except ValueError as e:  # e.g. no local XNLI train split, bad labels in a file
        raise UsageError(str(e)) from e

    tokenizer = load_tokenizer(cfg.spec)
    model = load_model(cfg.spec, cfg.task, quantize=cfg.quantize, device=cfg.device, bf16=a["bf16"],
                       gradient_checkpointing=a["gradient_checkpointing"])
    if cfg.load_ckpt:
        model = load_checked(model, cfg.load_ckpt, is_trainable=not a["eval_only"])
    else:
        model = add_lora(model, lora_config(cfg.spec, cfg.task, r=a["lora_r"], alpha=a["lora_alpha"],
                                            dropout=a["lora_dropout"], target_modules=cfg.target_modules,
                                            freeze_head=a["freeze_lm_head"]))
    param_total, param_train = count_parameters(model)
    logger.info("parameters: %d total, %d trainable (%.3f%%)", param_total, param_train,
                100 * param_train / max(param_total, 1))

    def evaluator(ds):
        return Evaluator(cfg.task, cfg.spec, tokenizer, ds, cfg.max_length, batch_size=a["batch_size"],
                         doc_stride=a["doc_stride"], max_answer_length=a["max_answer_length"],
                         generate_max_tokens=a["generate_max_tokens"], parse=a["parse"],
                         eval_mode=a["eval_mode"])

    results: dict = {}
    if not a["eval_only"]:
        feats, label_names = train_features(cfg.task, cfg.spec, tokenizer, train_ds, cfg.max_length, a["doc_stride"])
        val_eval = evaluator(val_ds)
        keep = ("input_ids", "attention_mask", "token_type_ids", *label_names)
        trainer = FlareTrainer(
            model=model, args=training_arguments(cfg, len(feats), label_names, info.best_metric),
            train_dataset=feats, eval_dataset=val_eval.features,
            data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side, keep=keep),
            processing_class=tokenizer, evaluator=val_eval,
        )
        resume = a["resume_from_checkpoint"]
        t0 = time.time()
        train_out = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
        results.update(trainer.summary(train_out, time.time() - t0),
                       n_train=len(train_ds), n_train_features=len(feats))
        save_adapter(model, cfg.run_dir)

    test_eval = evaluator(test_ds)
    t0 = time.time()
    predictions = test_eval.predict(model)  # no_grad, eval mode
    metrics = test_eval.score(predictions)
    results.update({f"test_{k}": v for k, v in metrics.items()})
    results.update(test_runtime=time.time() - t0, n_test=len(test_ds), param_total=param_total,
                   param_train=param_train, run_name=cfg.run_name, mode="task_ft")
    results.update({k: v for k, v in cfg.describe().items() if k not in results})
    results["args"] = a
    if not a["eval_only"]:
        write_json_atomic(cfg.run_dir / "run_config.json", cfg.describe() | {"args": a})
    write_jsonl_atomic(cfg.run_dir / "predictions_test.jsonl", test_eval.records(predictions))
    write_json_atomic(cfg.run_dir / "results_test.json", results)
    logger.info("test metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    logger.info("wrote %s", cfg.run_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args)
    except (UsageError, ValueError) as e:
        return fail(str(e))
    from flare.models.loading import CheckpointError

    try:
        run(cfg)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
