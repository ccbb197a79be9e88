"""Stage 1: LoRA fine-tuning of a pretrained model on (English) task data. Entry point: ``run_task_ft.py``.

Writes ``{output_dir}/{task}-{lang}-{plm}-{seed}/``: the adapter and head weights (``adapter_model.safetensors``),
``run_config.json``, ``results_test.json``, ``predictions_test.jsonl`` and bounded ``checkpoint-*`` folders.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flare.common_args import (
    UsageError,
    add_common_args,
    check_bf16,
    check_eval_mode,
    is_main_process,
    join_process_group,
    resolve_device,
)
from flare.config import TASKS, ModelSpec, model_name, resolve_model
from flare.languages import check_task_language
from flare.stages import (
    RunConfig,
    TrainingOptions,
    autocast_dtype,
    check_adapter_file,
    check_checkpoint_matches,
    check_output_dir,
    check_positive,
    check_resume,
    default_optim,
    resume_checkpoint,
    setup_tracking,
    stage_main,
    test_results,
    training_arguments,
    write_run,
)

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
class Stage1Config(RunConfig):
    """A stage-1 run, resolved and validated once from the flags (no model is loaded before this)."""

    lang: str


def resolve_config(args: argparse.Namespace) -> Stage1Config:
    """Validate every flag and derive the run's settings; raises :class:`UsageError`/``ValueError``."""
    spec = resolve_model(args.plm)
    if spec.family == "seq2seq":
        raise UsageError(f"--plm {args.plm} is a translation model; use it with run_translate.py --model")
    lang = check_task_language(args.task, args.lang)
    if args.adapter != "lora":
        raise UsageError(f"--adapter {args.adapter!r} is not supported; the only adapter is 'lora'")
    check_eval_mode(args.eval_mode, spec.family, args.task)
    quantize = args.quantize or spec.quantize
    if quantize != "none" and spec.family == "encoder":
        kind = TASKS[args.task].kind
        if not spec.head_modules(kind):
            raise UsageError(f"--quantize {quantize}: the {kind} head of {args.plm} is not known, so it would be "
                             "quantised too; use --quantize none")
    check_positive(args)
    load_ckpt = None
    if args.load_ckpt:
        from flare.files import read_run_config

        load_ckpt = Path(args.load_ckpt)
        if not load_ckpt.is_dir():
            raise UsageError(f"--load_ckpt {load_ckpt}: no such run directory")
        check_checkpoint_matches(load_ckpt, read_run_config(load_ckpt), args.task, args.plm)
        check_adapter_file(load_ckpt)
    check_output_dir(args.output_dir)
    plm_name = model_name(args.plm)
    run_name = f"{args.task}-{lang}-{plm_name}-{args.seed}"
    check_resume(args.resume_from_checkpoint, Path(args.output_dir) / run_name)
    device = resolve_device(args.device)  # last: it imports torch
    check_bf16(args.bf16, device, args.fp16)
    return Stage1Config(
        task=args.task, lang=lang, spec=spec, plm=args.plm, plm_name=plm_name, seed=args.seed, device=device,
        quantize=quantize, max_length=args.max_length or TASKS[args.task].max_length,
        optim=default_optim(args.optim, quantize, device),
        target_modules=tuple(args.target_modules or spec.lora_targets), run_name=run_name,
        run_dir=Path(args.output_dir) / run_name, load_ckpt=load_ckpt, opts=TrainingOptions.from_args(args),
        args=vars(args).copy(),
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


def run(cfg: Stage1Config) -> dict:
    from transformers import set_seed

    from flare.data import load_task
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

    o, info = cfg.opts, TASKS[cfg.task]
    setup_tracking(o)
    set_seed(cfg.seed)
    # data first: a missing file or split fails before any model is loaded
    try:
        train_ds = None if o.eval_only else _limit(load_task(cfg.task, cfg.lang, o.train_split,
                                                                o.data_dir), o.max_train_samples)
        val_ds = _limit(load_task(cfg.task, cfg.lang, "validation", o.data_dir), o.max_eval_samples)
        test_ds = _limit(load_task(cfg.task, cfg.lang, "test", o.data_dir), o.max_eval_samples)
    except ValueError as e:  # e.g. no local XNLI train split, bad labels in a file
        raise UsageError(str(e)) from e

    tokenizer = load_tokenizer(cfg.spec)
    if cfg.spec.family == "decoder":  # before the model loads
        from flare.data.features import check_prompt_fits

        check_prompt_fits(cfg.task, tokenizer, cfg.max_length)
    model = load_model(cfg.spec, cfg.task, quantize=cfg.quantize, device=cfg.device, bf16=o.bf16, fp16=o.fp16,
                       gradient_checkpointing=o.gradient_checkpointing)
    if cfg.load_ckpt:
        model = load_checked(model, cfg.load_ckpt, is_trainable=not o.eval_only)
    else:
        model = add_lora(model, lora_config(cfg.spec, cfg.task, r=o.lora_r, alpha=o.lora_alpha,
                                            dropout=o.lora_dropout, target_modules=cfg.target_modules,
                                            freeze_head=o.freeze_lm_head))
    param_total, param_train = count_parameters(model)
    logger.info("parameters: %d total, %d trainable (%.3f%%)", param_total, param_train,
                100 * param_train / max(param_total, 1))

    def evaluator(ds):
        return Evaluator(cfg.task, cfg.spec, tokenizer, ds, cfg.max_length, batch_size=o.batch_size,
                         doc_stride=o.doc_stride, max_answer_length=o.max_answer_length,
                         generate_max_tokens=o.generate_max_tokens, parse=o.parse,
                         eval_mode=o.eval_mode, autocast=autocast_dtype(o))

    results: dict = {}
    if not o.eval_only:
        feats, label_names = train_features(cfg.task, cfg.spec, tokenizer, train_ds, cfg.max_length, o.doc_stride)
        val_eval = evaluator(val_ds)
        keep = ("input_ids", "attention_mask", "token_type_ids", *label_names)
        trainer = FlareTrainer(
            model=model, args=training_arguments(cfg, len(feats), label_names, info.best_metric),
            train_dataset=feats, eval_dataset=val_eval.features,
            data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side, keep=keep),
            processing_class=tokenizer, evaluator=val_eval,
        )
        t0 = time.time()
        train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(o.resume_from_checkpoint, cfg.run_dir))
        results.update(trainer.summary(train_out, time.time() - t0),
                       n_train=len(train_ds), n_train_features=len(feats))
        if is_main_process():  # distributed: rank 0 writes
            save_adapter(model, cfg.run_dir)

    if o.eval_only:
        join_process_group(cfg.device)  # torchrun: the evaluation sharded, as after training
    test_eval = evaluator(test_ds)
    t0 = time.time()
    predictions = test_eval.predict(model)  # no_grad, eval mode
    metrics = test_eval.score(predictions)
    results.update(test_results(metrics, time.time() - t0, len(test_ds), param_total, param_train),
                   run_name=cfg.run_name, mode="task_ft", eval_processes=test_eval.processes)
    logger.info("test metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    # an --eval_only run of a saved run leaves that run's run_config.json as it is
    return write_run(cfg, results, test_eval.records(predictions), "test", config=not o.eval_only)


def main(argv: list[str] | None = None) -> int:
    return stage_main(build_parser, resolve_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
