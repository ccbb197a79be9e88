"""What stage 1 (``run_task_ft.py``) and stage 2 (``run.py``) share: the typed options of the common flags, the base
run config, the flag checks, the Trainer's arguments, the results files and ``main``.

Each stage adds its own fields to :class:`RunConfig` and its own ``resolve_config``/``run``; the code reads options
as attributes (``cfg.opts.lr``), never from the raw flag dict, which is only recorded (``run_config.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flare.common_args import FlareError, UsageError, fail, is_main_process, world_size
from flare.config import ModelSpec, model_name
from flare.files import write_json_atomic, write_jsonl_atomic

logger = logging.getLogger("flare.stages")

POSITIVE = ("lora_r", "lora_alpha", "batch_size", "epochs", "num_evals", "gradient_accumulation_steps",
            "generate_max_tokens", "doc_stride", "max_answer_length", "save_total_limit")
POSITIVE_IF_GIVEN = ("max_length", "max_steps", "max_train_samples", "max_eval_samples")


@dataclass(frozen=True)
class TrainingOptions:
    """The flags of :func:`flare.common_args.add_common_args` (and ``--train_split``) that shape data, training and
    evaluation, typed. Built from the parsed flags by :meth:`from_args`."""

    lr: float
    batch_size: int
    epochs: int
    max_steps: int | None
    gradient_accumulation_steps: int
    num_evals: int
    save_total_limit: int
    group_by_length: bool
    resume_from_checkpoint: str | None
    report_to: str
    wandb_project: str
    bf16: bool
    fp16: bool
    gradient_checkpointing: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    freeze_lm_head: bool
    eval_only: bool
    data_dir: str | None
    train_split: str
    max_train_samples: int | None
    max_eval_samples: int | None
    doc_stride: int
    max_answer_length: int
    generate_max_tokens: int
    parse: str
    eval_mode: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class RunConfig:
    """Everything a run of either stage needs, resolved and validated once from the flags (before any model loads).
    ``args`` is the flags as given, kept only to be recorded in ``run_config.json`` and the results."""

    task: str
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
    opts: TrainingOptions
    args: dict

    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("spec", "opts", "args")  # not JSON values, or recorded apart

    def describe(self) -> dict:
        """The run's settings as JSON values (``run_config.json``; the loaders read task, plm_name, quantize and
        max_length back)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NOT_RECORDED}
        out = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
        out["hub_id"], out["family"], out["model_type"] = self.spec.hub_id, self.spec.family, self.spec.model_type
        return out

    def record(self) -> dict:
        return self.describe() | {"args": self.args}


def check_positive(args: argparse.Namespace, names: tuple[str, ...] = POSITIVE) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in POSITIVE_IF_GIVEN:
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive (got {getattr(args, name)}); leave it out for the default")


def check_resume(resume: str | None, run_dir: Path) -> None:
    """``--resume_from_checkpoint``: 'last' needs a complete checkpoint in the run directory, a path must be a
    complete checkpoint (:func:`flare.files.checkpoint_problem`)."""
    from flare.files import checkpoint_problem, newest_complete_checkpoint

    if resume is None:
        return
    if resume == "last":
        found, skipped = newest_complete_checkpoint(run_dir)
        if found is None:
            why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped)
            raise UsageError(f"--resume_from_checkpoint last: {run_dir} has no complete checkpoint to resume"
                             f"{' (' + why + ')' if why else ''}; drop the flag to start the run from the beginning")
    elif (problem := checkpoint_problem(Path(resume))) is not None:
        raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint folder ({problem}); pass "
                         f"one of {run_dir}/checkpoint-*, or 'last' for the newest complete one")


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint folder the Trainer resumes from: 'last' is the newest COMPLETE ``checkpoint-N`` of the run
    directory (a save cut by a time limit or a preemption leaves a newer, incomplete one: it is named in the log
    and moved aside to ``incomplete-checkpoint-N``, so the Trainer's checkpoint rotation never keeps it in place of
    a good one)."""
    from flare.files import newest_complete_checkpoint

    if resume != "last":
        return resume
    found, skipped = newest_complete_checkpoint(run_dir)
    for path, problem in skipped:
        logger.warning("!!! %s is incomplete (%s), a save cut short: skipped, resuming from %s", path, problem,
                       found.name if found else None)
        if is_main_process():
            with contextlib.suppress(OSError):  # another rank moved it already
                path.rename(path.with_name("incomplete-" + path.name))
    if found is None:
        raise UsageError(f"--resume_from_checkpoint last: {run_dir} has no complete checkpoint to resume; drop the "
                         "flag to start the run from the beginning")
    logger.info("resuming from %s", found)
    return str(found)


def check_output_dir(output_dir: str | Path) -> None:
    """The run directory can be made under ``output_dir``: checked before any model is loaded, so a typo costs
    seconds, not a training run."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_dir {output_dir}: {existing} is not a folder (a file is in the way); pass a "
                         "folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir}: {existing} is not writable by this user; pass a folder you "
                         "can write to")


def check_adapter_file(load_ckpt: Path) -> None:
    """A run directory's adapter file is complete (its safetensors header and data agree): a truncated copy fails
    here, before any model is loaded, rather than deep inside peft. Read with the standard library (an 8-byte
    little-endian header size, a JSON header of tensor offsets, the data), so a bad flag never waits for torch."""
    from flare.errors import CheckpointError
    from flare.files import ADAPTER_FILE, safetensors_problem

    path = load_ckpt / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"{load_ckpt}: no {ADAPTER_FILE}; pass a run directory written by run_task_ft.py")
    if (problem := safetensors_problem(path)) is not None:
        raise CheckpointError(f"{path} is truncated or corrupt ({problem}); copy it again or re-run run_task_ft.py")


def check_checkpoint_matches(load_ckpt: Path, saved: dict, task: str, plm: str, fix: str = "") -> None:
    """``saved`` (a run's ``run_config.json``) is a STAGE-1 run of this task and model."""
    if "target_lang" in saved:
        raise UsageError(f"--load_ckpt {load_ckpt} is a stage-2 run ({saved.get('mode')}, {saved.get('source_lang')}"
                         f"->{saved.get('target_lang')}); pass the stage-1 run it started from: "
                         f"{saved.get('load_ckpt')}")
    if saved.get("task") != task or saved.get("plm_name") != model_name(plm):
        raise UsageError(f"--load_ckpt {load_ckpt} was trained for task {saved.get('task')!r} with model "
                         f"{saved.get('plm_name')!r}, not {task!r} with {model_name(plm)!r}{fix}")


def default_optim(optim: str | None, quantize: str, device: str) -> str:
    """--optim, else 8-bit AdamW for quantised models on a GPU (as the original), else AdamW."""
    return optim or ("adamw_bnb_8bit" if quantize != "none" and device.startswith("cuda") else "adamw_torch")


def setup_tracking(opts: TrainingOptions) -> None:
    if opts.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", opts.wandb_project)


def step_budget(n_train: int, opts: TrainingOptions) -> int:
    """Optimizer steps of a run: --max_steps, else --epochs passes over ``n_train`` training features. One step
    consumes batch x accumulation x processes examples: under torchrun / accelerate launch --epochs E means E
    passes over the data, not E x world_size."""
    if opts.max_steps:
        return opts.max_steps
    global_batch = min(opts.batch_size, n_train) * opts.gradient_accumulation_steps * world_size()
    return max(n_train * opts.epochs // global_batch, 1)


def autocast_dtype(opts: TrainingOptions):
    """The dtype training runs its matmuls in under --bf16 / --fp16 (None: fp32)."""
    import torch

    return torch.bfloat16 if opts.bf16 else torch.float16 if opts.fp16 else None


def use_tf32(device: str, opts: TrainingOptions) -> bool | None:
    """TF32 matmuls on an Ampere or newer GPU (about 10-bit mantissa products, fp32 accumulation: the usual setting
    for fp32 fine-tuning there), also under --bf16 / --fp16: what runs outside autocast (the optimizer's fp32
    arithmetic, a loss or norm kept in fp32) would otherwise pay full fp32 matmuls; None leaves torch's default
    elsewhere."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8 or None


def training_arguments(cfg: RunConfig, n_train: int, label_names: tuple[str, ...], best_metric: str):
    """The Trainer's arguments: linear schedule with 10 % warm-up, ``num_evals`` evenly spaced validations (and
    checkpoints), the best kept by ``best_metric``."""
    from flare.trainer import FlareTrainingArguments

    o = cfg.opts
    batch_size = min(o.batch_size, n_train)
    max_steps = step_budget(n_train, o)
    eval_steps = max(max_steps // o.num_evals, 1)
    return FlareTrainingArguments(
        output_dir=str(cfg.run_dir), run_name=cfg.run_name, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps, learning_rate=o.lr,
        lr_scheduler_type="linear", warmup_steps=int(0.1 * max_steps), max_steps=max_steps,
        eval_strategy="steps", save_strategy="steps", eval_steps=eval_steps, save_steps=eval_steps,
        logging_steps=max(max_steps // 100, 1), logging_first_step=True,
        load_best_model_at_end=True, metric_for_best_model=f"eval_{best_metric}", greater_is_better=True,
        save_total_limit=o.save_total_limit, report_to=[] if o.report_to == "none" else [o.report_to],
        bf16=o.bf16, fp16=o.fp16, tf32=use_tf32(cfg.device, o), optim=cfg.optim, use_cpu=cfg.device == "cpu",
        label_names=list(label_names),
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if o.group_by_length else "random",
        activation_checkpointing=False,  # enabled on the model itself (non-reentrant) when asked
        # every trainable parameter (LoRA, heads, fusion modules) gets a gradient in every step: DDP need not search
        # the graph for unused ones (transformers' default for a peft model is to search, and warn that none was found)
        ddp_find_unused_parameters=False,
    )


def test_results(metrics: dict, seconds: float, n_test: int, param_total: int, param_train: int) -> dict:
    """The test part of ``results_*.json`` (both stages)."""
    return {**{f"test_{k}": v for k, v in metrics.items()}, "test_runtime": seconds, "n_test": n_test,
            "param_total": param_total, "param_train": param_train}


def write_run(cfg: RunConfig, results: dict, records: list[dict], prefix: str, config: bool = True) -> dict:
    """Complete ``results`` with the run's settings and flags, then write ``run_config.json`` (if ``config``),
    ``predictions_{prefix}.jsonl`` and, last, ``results_{prefix}.json`` (whose presence marks a finished run).
    In a distributed run only rank 0 writes."""
    results.update({k: v for k, v in cfg.describe().items() if k not in results})
    results["args"] = cfg.args
    if not is_main_process():  # distributed: every rank evaluated the same model; rank 0 alone writes
        return results
    if config:
        write_json_atomic(cfg.run_dir / "run_config.json", cfg.record())
    write_jsonl_atomic(cfg.run_dir / f"predictions_{prefix}.jsonl", records)
    write_json_atomic(cfg.run_dir / f"results_{prefix}.json", results)
    logger.info("wrote %s", cfg.run_dir)
    return results


def stage_main(build_parser: Callable[[], argparse.ArgumentParser], resolve_config: Callable,
               run: Callable, argv: list[str] | None = None) -> int:
    """Parse, validate every flag before a model loads, run; a project error (:class:`FlareError`) is one line on
    stderr and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    from flare.common_args import setup_logging

    setup_logging()
    try:
        cfg = resolve_config(args)
    except (FlareError, ValueError) as e:  # flag checks (some raise the builtin ValueError of a parser)
        return fail(str(e))
    try:
        run(cfg)  # loads and checks the data before any model
    except (FlareError, FileNotFoundError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("flare.stages is a library; run run_task_ft.py or run.py")
