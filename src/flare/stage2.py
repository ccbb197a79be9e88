"""Stage 2: cross-lingual transfer from the stage-1 English model, in every mode of the paper. Entry point: ``run.py``.

Modes (flags as the original's run.py):

==================  =========================================================  ==========================
mode                flags                                                      adapter (original's name)
==================  =========================================================  ==========================
zero-shot           ``--eval_zs --eval_only``                                  none (stage-1 model)
translate-test      ``--translate-test --path_mt .../translate-en-<mt>``       none (stage-1 model)
translate-train     ``--adapter lora --translate-train --path_mt ...``         ``lora-default``
xmixup              ... ``--xmixup``                                           ``xmixup``
input-fusion        ... ``--input_fusion``                                     ``inputfusion``
flare               ... ``--fusion_fn add|add_relu|mul|cross-attention|...``   ``flare-{fn}``
flare-mt            ... ``--fusion_fn ... --fuse_mt --mt_model nllb-600m``     ``flare-fusemt``
==================  =========================================================  ==========================

Every mode loads ``--load_ckpt`` (a run directory of run_task_ft.py) and verifies that each adapter and head tensor
loaded. Training modes keep the English task LoRA as a frozen adapter (``--stage1_merge none``, the default; see
:mod:`flare.models.stack`) and train a new LoRA (+ a copy of the task head) on top of it on the translated training
data. Before training, the first validation batch proves that the stage-2 model with its fresh adapter computes the
stage-1 model's outputs (``stage1_start_max_abs_diff``, an error above 1e-5 unless ``--stage1_merge requantize``).
Writes ``{output_dir}/{run_name}/`` with
``results_{zs|test}.json``, ``predictions_{zs|test}.jsonl``, ``run_config.json``, the new adapter
(``adapter_model.safetensors``) and the fusion modules (``fusion_model.safetensors``: cross-attention, MT projection).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flare.common_args import (
    UsageError,
    add_common_args,
    check_bf16,
    check_eval_mode,
    is_main_process,
    join_process_group,
    resolve_device,
)
from flare.config import (
    DECODER_FUSION_FNS,
    FUSION_FNS,
    TASKS,
    ModelSpec,
    model_name,
    resolve_model,
    resolve_translation_model,
)
from flare.errors import CheckpointError, FlareError
from flare.languages import check_task_language
from flare.stages import (
    POSITIVE,
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

logger = logging.getLogger("flare.run")

MODES = ("zero-shot", "translate-test", "translate-train", "xmixup", "input-fusion", "flare", "flare-mt")
ADAPTER_NAMES = {"translate-train": "lora-default", "xmixup": "xmixup", "input-fusion": "inputfusion",
                 "flare-mt": "flare-fusemt"}
STAGE1_MERGE = ("none", "exact", "requantize")
STAGE1_TOLERANCE = 1e-5  # largest |logit| difference between the fresh stage-2 model and the stage-1 model
# examples of the first validation batch that the start check runs: a decoder's full-vocabulary logits of a
# whole batch are large (Gemma 2, 256k words x 384 tokens x 32 rows in fp32: 12.6 GB, held twice)
PROBE_ROWS = 4


class Stage1MismatchError(FlareError, RuntimeError):
    """The stage-2 model with its fresh adapter does not compute the stage-1 model's outputs."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 2 of FLARE: transfer the English task model to a target "
                                            "language (zero-shot, translate-test, translate-train LoRA, input-level "
                                            "fusion, FLARE, FLARE MT).")
    add_common_args(p)
    p.set_defaults(adapter=None)
    p.add_argument("--source_lang", default="en", help="source language of the stage-1 model (default en)")
    p.add_argument("--target_lang", required=True, help="target language code (e.g. es, jav, sw)")
    p.add_argument("--load_ckpt", default=None, help="REQUIRED: the stage-1 run directory (run_task_ft.py output)")
    p.add_argument("--eval_zs", action="store_true",
                   help="zero-shot: evaluate the stage-1 model on the target test set")
    p.add_argument("--translate-test", dest="translate_test", action="store_true",
                   help="translate-test: evaluate the stage-1 model on the target test set translated into English")
    p.add_argument("--translate-train", dest="translate_train", action="store_true",
                   help="train on the English training data translated into the target language (--path_mt)")
    p.add_argument("--path_mt", default=None,
                   help="translation folder of run_translate.py, translations/{task}/translate-{tgt}-{mt} (or "
                        "translate-{src}-{mt}; the other direction is found beside it)")
    p.add_argument("--eval_stage2", default=None, metavar="RUN_DIR",
                   help="evaluate a trained stage-2 run (its adapter, head and fusion modules) on the test set again, "
                        "with the test translations of --path_mt (e.g. a model trained on one MT, tested with "
                        "another MT's English); every other setting is the run's own (its run_config.json); writes "
                        "OUTPUT_DIR/<run>-evaltest-<path_mt folder>")
    p.add_argument("--validation_set", default="translated", choices=["translated", "target"],
                   help="the validation set that selects the checkpoint. translated (the original): the English "
                        "validation set translated into the target language, the fusion modes reading its gold "
                        "English; target: the target-language validation set paired as the test set is (the fusion "
                        "modes read its MT translation into English), so selection sees the MT it is tested with "
                        "(needs the validation split of the backward translation: run_translate.py --splits "
                        "validation test; not for TyDiQA, which has no target-language validation set)")
    p.add_argument("--train_split", default="train", choices=["train", "validation"],
                   help="translated split to train on; 'validation' for local XNLI (data/ has no XNLI train set)")
    p.add_argument("--fusion_fn", default=None, choices=FUSION_FNS,
                   help="FLARE fusion function in the LoRA bottleneck (matmul/matmul_relu: undocumented in the paper)")
    p.add_argument("--cross_attention_heads", type=int, default=1, help="heads of the cross-attention fusion")
    p.add_argument("--fuse_mt", action="store_true",
                   help="FLARE MT: fuse a frozen NLLB encoder's states of the target text (needs --fusion_fn, "
                        "--mt_model)")
    p.add_argument("--mt_model", default=None, help="FLARE MT encoder: nllb-600m, nllb-3.3b or a local NLLB folder")
    p.add_argument("--input_fusion", action="store_true",
                   help="input-level fusion baseline: English + target in one input, max_length doubled")
    p.add_argument("--xmixup", action="store_true",
                   help="X-Mixup (Yang et al., 2022): the target's states after self-attention attend to the English "
                        "source's in the mixed layers and are mixed with them (ratio from the attention entropy); "
                        "loss alpha*CE(en) + (1-alpha)*CE(target) + KL + MSE; the target alone at test time")
    p.add_argument("--xmixup_layers", nargs=2, type=int, default=None, metavar=("START", "END"),
                   help="X-Mixup's mixed layers [START, END) (default: X-Mixup's 1 20 of 24 layers, scaled to the "
                        "model's depth: 1 10 for 12 layers, 1 27 for 32)")
    p.add_argument("--xmixup_alpha", type=float, default=0.4,
                   help="X-Mixup: weight of the English cross-entropy (the target's is 1 - alpha; default 0.4)")
    p.add_argument("--xmixup_lambda0", type=float, default=0.5,
                   help="X-Mixup: the largest mixing ratio, lambda = lambda0 * sigmoid(w * entropy + b) (default 0.5)")
    p.add_argument("--xmixup_kl", type=float, default=1.0,
                   help="X-Mixup: weight of KL(p_en || p_target) (default 1; 0 turns it off; extractive QA has none)")
    p.add_argument("--xmixup_mse", type=float, default=1.0,
                   help="X-Mixup: weight of the MSE between the first-token representations (decoders: the last "
                        "prompt token's; default 1; 0 turns it off)")
    p.add_argument("--cache_source_states", action="store_true",
                   help="FLARE / FLARE MT: compute each example's English layer inputs (MT: NLLB states) once, keep "
                        "them in CPU memory and reuse them every epoch and validation (the source model is frozen). "
                        "Pays for small models and data sets (me5-small on NusaX: ~1 MB per example); off by default")
    p.add_argument("--cache_source_mb", type=float, default=4096,
                   help="memory bound of --cache_source_states in MB; examples past it are recomputed (default 4096)")
    p.add_argument("--stage1_merge", default="none", choices=STAGE1_MERGE,
                   help="how training modes hold the stage-1 LoRA: none = a frozen adapter under the new one (exact "
                        "on any base); exact = merged into unquantised base weights (exact, a little faster); "
                        "requantize = merged into 4-bit/8-bit weights as the original did (re-quantising loses most "
                        "of it: see docs/fusion.md)")
    return p


@dataclass(frozen=True)
class Stage2Config(RunConfig):
    """A stage-2 run, resolved and validated once from the flags and input paths (no model is loaded before this);
    ``load_ckpt`` is the stage-1 run directory."""

    mode: str
    source_lang: str
    target_lang: str
    adapter_name: str | None
    fusion_fn: str | None
    mt_spec: ModelSpec | None
    path_mt: Path | None
    prefix: str  # results_{prefix}.json: zs | test
    stage1_merge: str
    cross_attention_heads: int
    cache_source_states: bool
    cache_source_mb: float
    validation_set: str
    eval_stage2: Path | None = None  # a trained stage-2 run evaluated again (no training)
    xmixup_layers: tuple[int, int] | None = None  # X-Mixup's mixed layers [start, end)

    NOT_RECORDED: ClassVar[tuple[str, ...]] = (*RunConfig.NOT_RECORDED, "mt_spec")

    @property
    def trains(self) -> bool:
        return self.mode not in ("zero-shot", "translate-test") and self.eval_stage2 is None

    def describe(self) -> dict:
        return super().describe() | {"mt_model": self.mt_spec.hub_id if self.mt_spec else None}


def resolve_mode(args: argparse.Namespace) -> str:
    """The mode the flags ask for; contradictory or incomplete flags raise :class:`UsageError`."""
    if args.fusion_fn and args.input_fusion:
        raise UsageError("--fusion_fn and --input_fusion are two different methods; pass one of them")
    xmixup = getattr(args, "xmixup", False)
    if xmixup and (args.fusion_fn or args.input_fusion):
        raise UsageError(f"--xmixup and {'--fusion_fn' if args.fusion_fn else '--input_fusion'} are two different "
                         "methods; pass one of them")
    if args.fuse_mt and not args.fusion_fn:
        raise UsageError("--fuse_mt needs --fusion_fn (e.g. --fusion_fn add_relu): FLARE MT fuses with it")
    if args.fuse_mt and not args.mt_model:
        raise UsageError("--fuse_mt needs --mt_model (nllb-600m, nllb-3.3b or a local NLLB folder)")
    if args.mt_model and not args.fuse_mt:
        raise UsageError("--mt_model is only used by FLARE MT; add --fuse_mt --fusion_fn ... or drop --mt_model")
    evals = [name for name, on in (("--eval_zs", args.eval_zs), ("--translate-test", args.translate_test)) if on]
    trains = [name for name, on in (("--adapter", args.adapter), ("--fusion_fn", args.fusion_fn),
                                    ("--input_fusion", args.input_fusion), ("--xmixup", xmixup)) if on]
    if len(evals) > 1 or (evals and trains):
        raise UsageError(f"{' and '.join(evals + trains)} select different modes; run them separately")
    if args.eval_zs:
        return "zero-shot"
    if args.translate_test:
        return "translate-test"
    if args.adapter is None:
        if trains:
            raise UsageError(f"{trains[0]} trains a new adapter: add --adapter lora")
        raise UsageError("no mode selected: pass --eval_zs --eval_only (zero-shot), --translate-test, or --adapter "
                         "lora --translate-train --path_mt ... [--input_fusion | --fusion_fn FN [--fuse_mt]]")
    if args.adapter != "lora":
        raise UsageError(f"--adapter {args.adapter!r} is not supported; the only adapter is 'lora'")
    if args.input_fusion:
        return "input-fusion"
    if xmixup:
        return "xmixup"
    if args.fusion_fn:
        return "flare-mt" if args.fuse_mt else "flare"
    return "translate-train"


def run_name(args: argparse.Namespace, src: str, tgt: str, plm_name: str) -> str:
    """The original's run name (reference section 6.1)."""
    name = f"{args.task}-{src}-{tgt}-{plm_name}-{args.seed}"
    if args.adapter:
        name += f"-{args.adapter}-{args.lora_r}"
    if args.fusion_fn:
        name += f"_{args.fusion_fn}"
    if args.path_mt:
        name += f"-{Path(args.path_mt).name}"
    for flag, suffix in (("translate_test", "-ttest"), ("translate_train", "-ttrain"), ("fuse_mt", "-fusemt"),
                         ("input_fusion", "-inputfusion"), ("xmixup", "-xmixup")):
        if getattr(args, flag, False):
            name += suffix
    if getattr(args, "validation_set", "translated") == "target":
        name += "-valtarget"
    return name


def evaluated_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--eval_stage2 RUN_DIR``: the run's own flags (its run_config.json), with this call's --path_mt (default: the
    run's), --output_dir, --device, --data_dir and --max_eval_samples."""
    from flare.files import read_run_config

    run = Path(args.eval_stage2)
    try:
        saved = read_run_config(run)
    except CheckpointError as e:
        raise UsageError(f"--eval_stage2 {run}: {e}") from e
    if saved.get("mode") not in ("translate-train", "xmixup", "input-fusion", "flare", "flare-mt"):
        raise UsageError(f"--eval_stage2 {run}: not a trained stage-2 run (mode {saved.get('mode')!r}); pass a run "
                         "directory of run.py with --adapter lora")
    if saved.get("stage1_merge", "none") != "none":
        raise UsageError(f"--eval_stage2 {run}: trained with --stage1_merge {saved['stage1_merge']}; only runs that "
                         "stacked the new adapter on the frozen stage-1 one (the default) are re-evaluated")
    check_adapter_file(run)
    merged = {**vars(args), **saved["args"]}  # a flag newer than the run keeps its default
    given = {k: getattr(args, k) for k in ("path_mt", "data_dir", "max_eval_samples") if getattr(args, k) is not None}
    merged.update(given, output_dir=args.output_dir, device=args.device, eval_stage2=str(run),
                  resume_from_checkpoint=None, eval_only=False)
    return argparse.Namespace(**merged)


XMIXUP_WEIGHTS = ("xmixup_alpha", "xmixup_lambda0", "xmixup_kl", "xmixup_mse")  # defaults: build_parser's


def check_xmixup(args: argparse.Namespace, mode: str, spec: ModelSpec, load_ckpt: Path) -> tuple[int, int] | None:
    """X-Mixup's flags, checked before any model is loaded; returns the mixed layers [start, end) (None for other
    modes). The model's depth is read from the stage-1 adapter's tensor names."""
    from flare.files import adapter_layer_count
    from flare.models.xmixup import default_layers

    defaults = build_parser()
    given = [f"--{k}" for k in XMIXUP_WEIGHTS if getattr(args, k, None) not in (None, defaults.get_default(k))]
    if getattr(args, "xmixup_layers", None) is not None:
        given.insert(0, "--xmixup_layers")
    if mode != "xmixup":
        if given:
            raise UsageError(f"{' '.join(given)} only apply to X-Mixup: add --xmixup or drop them")
        return None
    if spec.no_xmixup:
        raise UsageError(f"--xmixup with --plm {args.plm} ({spec.model_type}): {spec.no_xmixup}")
    if args.gradient_checkpointing:
        raise UsageError("--xmixup with --gradient_checkpointing: a recomputed layer cannot tell X-Mixup's English "
                         "pass from its target pass; drop --gradient_checkpointing (or lower --batch_size and use "
                         "--gradient_accumulation_steps)")
    for flag in ("xmixup_alpha", "xmixup_lambda0"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise UsageError(f"--{flag} {getattr(args, flag)} must lie in [0, 1]")
    for flag in ("xmixup_kl", "xmixup_mse"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} {getattr(args, flag)} is a loss weight: 0 or more")
    n_layers = adapter_layer_count(load_ckpt, spec.layers)
    start, end = args.xmixup_layers if args.xmixup_layers is not None else default_layers(n_layers)
    if not 0 <= start < end:
        raise UsageError(f"--xmixup_layers {start} {end}: need 0 <= START < END (layers [START, END) are mixed)")
    if n_layers and end > n_layers:
        raise UsageError(f"--xmixup_layers {start} {end}: the model has {n_layers} layers (0..{n_layers - 1}); END "
                         f"must be at most {n_layers}")
    return start, end


def resolve_config(args: argparse.Namespace) -> Stage2Config:
    """Validate every flag and input path before any model is loaded; raises :class:`UsageError`."""
    from flare.files import read_run_config

    if args.eval_stage2:
        args = evaluated_run_args(args)
    mode = resolve_mode(args)
    spec = resolve_model(args.plm)
    if spec.family == "seq2seq":
        raise UsageError(f"--plm {args.plm} is a translation model; use it with --fuse_mt --mt_model")
    src = check_task_language(args.task, args.source_lang)
    tgt = check_task_language(args.task, args.target_lang)
    if not args.load_ckpt:
        fix = (f"python run_task_ft.py --task {args.task} --plm {args.plm} --lang {src} --seed {args.seed}")
        raise UsageError(f"--load_ckpt is required: stage 2 starts from the stage-1 English model "
                         f"(e.g. checkpoints/{args.task}-{src}-{model_name(args.plm)}-{args.seed}, made by: {fix})")
    load_ckpt = Path(args.load_ckpt)
    if not load_ckpt.is_dir():
        raise UsageError(f"--load_ckpt {load_ckpt}: no such run directory (run run_task_ft.py first)")
    try:
        saved = read_run_config(load_ckpt)
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    check_checkpoint_matches(load_ckpt, saved, args.task, args.plm,
                             fix="; pass the stage-1 run of this task and model")
    check_adapter_file(load_ckpt)
    check_output_dir(args.output_dir)
    if src == tgt and mode != "zero-shot":
        raise UsageError(f"--target_lang {args.target_lang} is the source language: {mode} would pair {src} with "
                         "itself; pick another target language (zero-shot on the source language is the one check of "
                         "stage 1 that makes sense)")
    if args.eval_zs and not args.eval_only:
        logger.info("--eval_zs evaluates only (the original went on to train the task adapter without --eval_only)")
    trains = mode not in ("zero-shot", "translate-test")
    if trains and args.eval_only:
        raise UsageError(f"--eval_only with mode {mode}: there is no trained stage-2 adapter to evaluate; drop "
                         "--eval_only")
    path_mt = Path(args.path_mt) if args.path_mt else None
    if args.validation_set == "target" and not trains:
        raise UsageError(f"--validation_set target selects a trained checkpoint; {mode} trains none: drop it")
    if args.validation_set == "target" and args.task == "tydiqa":
        raise UsageError("--validation_set target: TyDiQA has no target-language validation set (its validation is "
                         "every 10th translated training row); drop the flag")
    if mode == "translate-test" and path_mt is None:
        raise UsageError(f"--translate-test needs --path_mt translations/{args.task}/translate-{src}-<mt> (made by "
                         f"run_translate.py --task {args.task} --source_lang {tgt} --target_lang {src})")
    if trains and not (args.translate_train and path_mt):
        raise UsageError(f"mode {mode} trains on translated data: pass --translate-train --path_mt "
                         f"translations/{args.task}/translate-{tgt}-<mt> (made by run_translate.sh; "
                         "--model reference gives the human translations of NusaX and XNLI)")
    if path_mt is not None and not path_mt.parent.is_dir():
        raise UsageError(f"--path_mt {path_mt}: folder {path_mt.parent} does not exist; run run_translate.py first")
    mt_spec = None
    if mode == "flare-mt":
        mt_spec = resolve_translation_model(args.mt_model, "--mt_model")
    target_modules = tuple(args.target_modules or spec.lora_targets)
    missing = [t for t in spec.fusion_targets if t not in target_modules and "all-linear" not in target_modules]
    if args.fusion_fn and missing:
        raise UsageError(f"--target_modules {' '.join(target_modules)} lacks the fusion targets {' '.join(missing)} "
                         f"of {spec.model_type}: FLARE fuses inside their LoRA; add them (e.g. --target_modules "
                         f"{' '.join(dict.fromkeys((*target_modules, *missing)))})")
    if args.fusion_fn and spec.no_fusion:
        raise UsageError(f"--fusion_fn with --plm {args.plm} ({spec.model_type}): {spec.no_fusion}")
    if args.fusion_fn and spec.family == "decoder" and args.fusion_fn not in DECODER_FUSION_FNS:
        raise UsageError(f"--fusion_fn {args.fusion_fn} is not causal, so a decoder cannot use it; choose one of: "
                         f"{', '.join(DECODER_FUSION_FNS)}")
    if args.cross_attention_heads <= 0 or args.lora_r % args.cross_attention_heads:
        raise UsageError(f"--cross_attention_heads {args.cross_attention_heads} must be positive and divide "
                         f"--lora_r {args.lora_r}")
    xmixup_layers = check_xmixup(args, mode, spec, load_ckpt)
    if args.cache_source_states and not args.fusion_fn:
        raise UsageError("--cache_source_states caches FLARE's source pass; it needs --fusion_fn (FLARE or FLARE MT)")
    check_positive(args, (*POSITIVE, "cache_source_mb"))
    check_eval_mode(args.eval_mode, spec.family, args.task)
    quantize = args.quantize or saved.get("quantize") or spec.quantize
    if trains and args.stage1_merge == "exact" and quantize != "none":
        raise UsageError(f"--stage1_merge exact: the base is quantised ({quantize}), and merging into quantised "
                         "weights re-quantises them (most of the stage-1 update is lost); use --stage1_merge none "
                         "(default, exact) or --stage1_merge requantize (the original's merge)")
    if trains and args.stage1_merge == "requantize" and quantize == "none":
        raise UsageError("--stage1_merge requantize: the base is not quantised, so merging is exact; use "
                         "--stage1_merge exact (or none)")
    max_length = args.max_length or saved.get("max_length") or TASKS[args.task].max_length
    if mode == "input-fusion":
        max_length *= 2
    name = run_name(args, src, tgt, model_name(args.plm))
    if args.eval_stage2:  # never the trained run's own directory
        name = f"{Path(args.eval_stage2).name}-evaltest-{Path(args.path_mt).name}"
    adapter_name = ADAPTER_NAMES.get(mode) or (f"flare-{args.fusion_fn}" if mode == "flare" else None)
    check_resume(args.resume_from_checkpoint, Path(args.output_dir) / name)
    device = resolve_device(args.device)  # last: it imports torch
    check_bf16(args.bf16, device, args.fp16)
    return Stage2Config(
        task=args.task, mode=mode, source_lang=src, target_lang=tgt, spec=spec, plm=args.plm,
        plm_name=model_name(args.plm), seed=args.seed, device=device, quantize=quantize, max_length=max_length,
        optim=default_optim(args.optim, quantize, device),
        target_modules=target_modules, adapter_name=adapter_name,
        fusion_fn=args.fusion_fn, mt_spec=mt_spec, path_mt=path_mt, run_name=name,
        run_dir=Path(args.output_dir) / name, load_ckpt=load_ckpt, prefix="zs" if mode == "zero-shot" else "test",
        stage1_merge=args.stage1_merge, cross_attention_heads=args.cross_attention_heads,
        cache_source_states=args.cache_source_states, cache_source_mb=args.cache_source_mb,
        validation_set=args.validation_set, eval_stage2=Path(args.eval_stage2) if args.eval_stage2 else None,
        xmixup_layers=xmixup_layers,
        opts=TrainingOptions.from_args(args), args=vars(args).copy(),
    )


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Stage2Data:
    train: object | None  # datasets.Dataset
    validation: object | None
    test: object
    counts: dict


def load_data(cfg: Stage2Config) -> Stage2Data:
    """Every dataset the mode needs, checked (files present, rows lining up) before a model is loaded."""
    from flare.data import load_task
    from flare.data.paired import (
        paired_test,
        paired_train,
        read_translation,
        split_qa_validation,
        translate_test,
        translation_dirs,
    )

    o, task, src, tgt = cfg.opts, cfg.task, cfg.source_lang, cfg.target_lang

    def limit(ds, n):
        return ds.select(range(min(n, len(ds)))) if n else ds

    try:
        target_test = load_task(task, tgt, "test", o.data_dir)
    except ValueError as e:
        raise UsageError(str(e)) from e
    counts: dict = {}
    if cfg.mode == "zero-shot":
        return Stage2Data(None, None, limit(target_test, o.max_eval_samples), counts)
    dirs = translation_dirs(cfg.path_mt, src, tgt)
    with_source = cfg.mode in ("flare", "input-fusion")  # the English beside the target at test time
    train_source = with_source or cfg.mode == "xmixup"  # X-Mixup reads the English in training only

    def test_set():
        if not with_source:  # translate-train LoRA and FLARE MT see only the target language at test time
            return target_test
        df = read_translation(dirs.backward, task, "test", tgt, src, dirs.mt_name)  # the English the fusions read
        return paired_test(task, target_test, df, str(dirs.backward)).dataset

    if cfg.eval_stage2 is not None:  # a trained run evaluated again: the test set alone
        return Stage2Data(None, None, limit(test_set(), o.max_eval_samples), counts)
    if cfg.mode == "translate-test":
        df = read_translation(dirs.backward, task, "test", tgt, src, dirs.mt_name)
        pair = translate_test(task, target_test, df, str(dirs.backward))
        counts["test_dropped_projection"] = pair.dropped
        return Stage2Data(None, None, limit(pair.dataset, o.max_eval_samples), counts)

    train_split = o.train_split
    if task == "tydiqa" and train_split != "train":
        raise UsageError("--train_split validation: TyDiQA translations have no validation file; its validation set "
                         "is every 10th translated training row")
    train_df = read_translation(dirs.forward, task, train_split, src, tgt, dirs.mt_name, need_source=train_source)
    train = paired_train(task, train_df, with_source=train_source)
    counts["train_dropped_projection"] = train.dropped
    if task == "tydiqa":
        train_ds, val_ds = split_qa_validation(train.dataset)
        if train_source and not with_source:  # X-Mixup validates on the target alone
            val_ds = val_ds.remove_columns([c for c in val_ds.column_names if c.startswith("src_")])
    else:
        if train_split == "validation":
            logger.warning("--train_split validation: training AND validating on the translated validation set")
        if cfg.validation_set == "target":  # paired as the test set: the real target text (+ its MT English)
            val_ds = load_task(task, tgt, "validation", o.data_dir)
            if with_source:
                val_mt = read_translation(dirs.backward, task, "validation", tgt, src, dirs.mt_name)
                val_ds = paired_test(task, val_ds, val_mt, str(dirs.backward)).dataset
        else:  # the English validation set translated (the original); the fusion modes read the gold English
            val_df = read_translation(dirs.forward, task, "validation", src, tgt, dirs.mt_name,
                                      need_source=with_source)
            val_ds = paired_train(task, val_df, with_source=with_source).dataset
        train_ds = train.dataset
    return Stage2Data(limit(train_ds, o.max_train_samples), limit(val_ds, o.max_eval_samples),
                      limit(test_set(), o.max_eval_samples), counts)


# ---------------------------------------------------------------------------------------------- model
def model_outputs(model, batch: dict, fusion=None):
    """Every score the model gives one batch (logits, or QA start and end logits), flattened, in eval mode."""
    import torch

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (fusion.source(batch) if fusion is not None else contextlib.nullcontext()):
            out = model(**inputs)
    finally:
        model.train(was_training)
    fields = [out.logits] if getattr(out, "logits", None) is not None else [out.start_logits, out.end_logits]
    return torch.cat([f.detach().flatten().cpu().float() for f in fields])  # no fp32 copy on the device


def make_fusion(model, cfg: Stage2Config, tokenizer, mt=None):
    """FLARE's fusion of the new adapter (None for the other modes), attached."""
    from flare.models.fusion import Fusion

    if cfg.mode not in ("flare", "flare-mt"):
        return None
    o, config = cfg.opts, model.get_base_model().config
    return Fusion(model, layers=cfg.spec.layers, targets=cfg.spec.fusion_targets, adapter="default",
                  fusion_fn=cfg.fusion_fn, padding_side=tokenizer.padding_side,
                  causal=cfg.spec.family == "decoder", cross_attention_heads=cfg.cross_attention_heads,
                  attention_dropout=float(getattr(config, "attention_probs_dropout_prob", None)
                                          or getattr(config, "attention_dropout", 0.0) or 0.0),
                  mt_encoder=mt, cache_source_states=cfg.cache_source_states,
                  cache_limit_mb=cfg.cache_source_mb, state_dtype=autocast_dtype(o),
                  autocast_dtype=autocast_dtype(o)).attach()


def make_xmixup(model, cfg: Stage2Config):
    """X-Mixup's hooks, gates and loss on the model with its new adapter (None for the other modes)."""
    from flare.models.xmixup import XMixup

    if cfg.mode != "xmixup":
        return None
    a = cfg.args
    start, end = cfg.xmixup_layers
    return XMixup(model, layers=cfg.spec.layers, family=cfg.spec.family, start=start, end=end,
                  lambda0=a["xmixup_lambda0"], alpha=a["xmixup_alpha"], kl_weight=a["xmixup_kl"],
                  mse_weight=a["xmixup_mse"], qa=TASKS[cfg.task].kind == "qa").attach()


def load_trained_adapter(model, cfg: Stage2Config, tokenizer, mt=None):
    """``--eval_stage2``: the trained run's adapter (and head) stacked on the frozen stage-1 one, loaded and
    verified like a stage-1 run, and its fusion modules; returns (model, fusion)."""
    from peft import set_peft_model_state_dict

    from flare.files import ADAPTER_FILE
    from flare.models.loading import load_adapter_state, lora_config, verify_loaded
    from flare.models.stack import NEW, activate, stack_new_adapter

    o = cfg.opts
    new = lora_config(cfg.spec, cfg.task, r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout,
                      target_modules=cfg.target_modules, freeze_head=o.freeze_lm_head)
    model = stack_new_adapter(model, new)
    weights = cfg.eval_stage2 / ADAPTER_FILE
    saved, _ = load_adapter_state(weights)
    set_peft_model_state_dict(model, saved, adapter_name=NEW)
    verify_loaded(model, saved, NEW, weights)
    activate(model)
    model.eval()
    fusion = make_fusion(model, cfg, tokenizer, mt)
    if fusion is not None:
        fusion.load(cfg.eval_stage2)
    return model, fusion


def build_model(cfg: Stage2Config, tokenizer, probe: dict | None = None, mt=None):
    """(model, fusion, start): the stage-1 model verifiably loaded; for training modes a new adapter on top of it
    (stacked, or after merging as ``--stage1_merge`` says) and its fusion. ``probe`` (a model-ready batch) checks
    that the fresh stage-2 model computes the stage-1 model's outputs: ``start`` records the largest difference."""
    from flare.models.loading import add_lora, load_checked, load_model, lora_config
    from flare.models.stack import STAGE1, stack_new_adapter

    o = cfg.opts
    base = load_model(cfg.spec, cfg.task, quantize=cfg.quantize, device=cfg.device, bf16=o.bf16, fp16=o.fp16,
                      gradient_checkpointing=o.gradient_checkpointing and cfg.trains)
    model = load_checked(base, cfg.load_ckpt, is_trainable=False, adapter_name=STAGE1)
    if cfg.eval_stage2 is not None:
        model, fusion = load_trained_adapter(model, cfg, tokenizer, mt)
        return model, fusion, {}
    if not cfg.trains:
        return model, None, {}
    reference = model_outputs(model, probe) if probe is not None else None  # the stage-1 model itself
    new = lora_config(cfg.spec, cfg.task, r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout,
                      target_modules=cfg.target_modules, freeze_head=o.freeze_lm_head)
    if cfg.stage1_merge == "none":
        model = stack_new_adapter(model, new)
    else:  # exact (unquantised) or requantize (the original's merge into quantised weights)
        model = add_lora(model.merge_and_unload(), new)
    fusion = make_fusion(model, cfg, tokenizer, mt)
    start: dict = {}
    if reference is not None:
        diff = (model_outputs(model, probe, fusion) - reference).abs().max().item()
        if fusion is not None:
            fusion.calls.update(train=0, eval=0)  # count the run's own calls only
        start = {"stage1_start_max_abs_diff": diff}
        logger.info("stage-2 model with its fresh adapter vs the stage-1 model: max |diff| %.3g (--stage1_merge %s)",
                    diff, cfg.stage1_merge)
        if diff > STAGE1_TOLERANCE:
            if cfg.stage1_merge != "requantize":
                raise Stage1MismatchError(
                    f"the stage-2 model with its fresh adapter differs from the stage-1 model by {diff:.3g} "
                    f"(> {STAGE1_TOLERANCE}) on the first validation batch; it must start from stage 1 exactly")
            logger.warning("!!! --stage1_merge requantize: stage 2 starts from a model that differs from the stage-1 "
                           "model by up to %.3g in its outputs (re-quantised merge, as the original)", diff)
    return model, fusion, start


def _features(cfg: Stage2Config, ds, tokenizer, mt, train: bool):
    from flare.data.stage2_features import stage2_features
    from flare.languages import nllb_code

    o = cfg.opts
    kwargs: dict = {}
    if cfg.mode == "flare-mt":
        code, fallback = nllb_code(cfg.target_lang, allow_fallback=True)
        if fallback:
            logger.warning("!!! NLLB has no code for %s: the MT encoder reads it as Indonesian (%s)", cfg.target_lang,
                           code)
        mt.lang_token_id(code)
        kwargs = dict(mt_tokenizer=mt.tokenizer, mt_lang_code=code)
    mode = cfg.mode if cfg.mode in ("flare", "flare-mt", "input-fusion") else "plain"
    if cfg.mode == "xmixup" and train:
        mode = "xmixup"  # the English training side with its labels; evaluation reads the target alone
    return ds.map(lambda b: stage2_features(b, task=cfg.task, spec=cfg.spec, tokenizer=tokenizer,
                                            max_length=cfg.max_length, doc_stride=o.doc_stride, train=train,
                                            mode=mode, **kwargs),
                  batched=True, remove_columns=ds.column_names, desc="train features" if train else "eval features")


def within_positions(cfg: Stage2Config, tokenizer) -> Stage2Config:
    """An encoder's inputs fit its position embeddings: input-level fusion doubles ``max_length`` (TyDiQA: 384 -> 768),
    past XLM-R's and me5-small's 512 positions, which failed with an index error inside the embeddings. Capped at
    the tokenizer's ``model_max_length``, with a warning; the run records the length it used."""
    import dataclasses

    limit = getattr(tokenizer, "model_max_length", None)
    if cfg.spec.family != "encoder" or not limit or limit > 100_000 or cfg.max_length <= limit:
        return cfg
    logger.warning("!!! max_length %d (%s) exceeds the %d positions of %s: capped at %d", cfg.max_length,
                   "input-level fusion doubles it" if cfg.mode == "input-fusion" else "--max_length", limit,
                   cfg.plm_name, limit)
    return dataclasses.replace(cfg, max_length=limit)


def run(cfg: Stage2Config) -> dict:
    data = load_data(cfg)  # every file checked first: before the model code is even imported (it takes seconds)
    from transformers import set_seed

    from flare.data.features import PadCollator
    from flare.data.stage2_features import MT_PREFIX, SOURCE_PREFIX
    from flare.evaluation import Evaluator
    from flare.models.loading import MTEncoder, count_parameters, load_tokenizer, save_adapter
    from flare.models.stack import NEW, activate, is_stacked
    from flare.trainer import FlareTrainer

    o, info = cfg.opts, TASKS[cfg.task]
    setup_tracking(o)
    set_seed(cfg.seed)  # loading the data draws no random numbers
    tokenizer = load_tokenizer(cfg.spec)
    cfg = within_positions(cfg, tokenizer)
    if cfg.spec.family == "decoder":  # before the model loads
        from flare.data.features import check_prompt_fits

        check_prompt_fits(cfg.task, tokenizer, cfg.max_length)
    mt = MTEncoder(cfg.mt_spec.hub_id, cfg.device) if cfg.mode == "flare-mt" else None
    pad_values = {"mt_input_ids": mt.tokenizer.pad_token_id} if mt is not None else None

    def extra_columns(feats) -> tuple[str, ...]:
        return tuple(c for c in feats.column_names if c.startswith((SOURCE_PREFIX, MT_PREFIX)))

    val_feats, probe = None, None
    if cfg.trains:  # the first validation batch also checks that stage 2 starts from the stage-1 model
        val_feats = _features(cfg, data.validation, tokenizer, mt, train=False)
        keep = ("input_ids", "attention_mask", "token_type_ids", *extra_columns(val_feats))
        rows = val_feats.select(range(min(o.batch_size, PROBE_ROWS, len(val_feats))))
        probe = {k: v.to(cfg.device) for k, v in PadCollator(tokenizer.pad_token_id, tokenizer.padding_side,
                                                              keep=keep, pad_values=pad_values)(list(rows)).items()}
    model, fusion, start = build_model(cfg, tokenizer, probe, mt)
    xmixup = make_xmixup(model, cfg) if cfg.trains else None
    param_total, param_train = count_parameters(model)
    logger.info("mode %s: %d parameters, %d trainable (%.3f%%)", cfg.mode, param_total, param_train,
                100 * param_train / max(param_total, 1))

    def evaluator(ds, feats=None):
        feats = feats if feats is not None else _features(cfg, ds, tokenizer, mt, train=False)
        return Evaluator(cfg.task, cfg.spec, tokenizer, ds, cfg.max_length, batch_size=o.batch_size,
                         doc_stride=o.doc_stride, max_answer_length=o.max_answer_length,
                         generate_max_tokens=o.generate_max_tokens, features=feats,
                         batch_context=fusion.source if fusion else None, extra_columns=extra_columns(feats),
                         pad_values=pad_values, parse=o.parse, eval_mode=o.eval_mode, autocast=autocast_dtype(o))

    results: dict = dict(data.counts, **start, stage1_merge=cfg.stage1_merge if cfg.trains else None)
    if cfg.eval_stage2 is not None:
        results.update(evaluated_run=str(cfg.eval_stage2), test_translations=str(cfg.path_mt))
    if cfg.trains:
        feats = _features(cfg, data.train, tokenizer, mt, train=True)
        label_names = ("labels",) if cfg.spec.family == "decoder" or info.kind == "cls" else (
            "start_positions", "end_positions")
        source_cols = extra_columns(feats)
        keep = ("input_ids", "attention_mask", "token_type_ids", *label_names, *source_cols)
        val_eval = evaluator(data.validation, val_feats)
        stacked = is_stacked(model)
        trainer = FlareTrainer(
            model=model, args=training_arguments(cfg, len(feats), label_names, info.best_metric),
            train_dataset=feats, eval_dataset=val_eval.features,
            data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side, keep=keep,
                                      pad_values=pad_values),
            processing_class=tokenizer, evaluator=val_eval, fusion=fusion, source_columns=source_cols,
            save_adapters=(NEW,) if stacked else None, xmixup=xmixup,
        )
        t0 = time.time()
        train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(o.resume_from_checkpoint, cfg.run_dir))
        if stacked:
            activate(model)  # the best checkpoint's reload may have reset which adapters the layers run
        results.update(trainer.summary(train_out, time.time() - t0),
                       n_train=len(data.train), n_train_features=len(feats), n_validation=len(data.validation))
        if is_main_process():  # distributed: rank 0 writes
            save_adapter(model, cfg.run_dir)
            if fusion is not None:
                fusion.save(cfg.run_dir)
            if xmixup is not None:
                xmixup.save(cfg.run_dir)
        if xmixup is not None:  # the mean mixing ratio per mixed layer over the last epoch's target positions
            results.update(xmixup_layers=list(cfg.xmixup_layers), xmixup_lambda_last_epoch=xmixup.lambda_means())
    calls_train = fusion.calls["train"] if fusion else 0

    if not cfg.trains:
        join_process_group(cfg.device)  # torchrun: the evaluation sharded, as after training
    test_eval = evaluator(data.test)
    t0 = time.time()
    predictions = test_eval.predict(model)
    metrics = test_eval.score(predictions)
    results.update(test_results(metrics, time.time() - t0, len(data.test), param_total, param_train),
                   run_name=cfg.run_name, mode=cfg.mode, eval_processes=test_eval.processes,
                   fusion_calls_train=calls_train,
                   fusion_calls_eval=fusion.calls["eval"] if fusion else 0)
    if fusion is not None and fusion.cache is not None:
        results.update(fusion.cache.summary())
    if fusion is not None and (results["fusion_calls_eval"] == 0 or (cfg.trains and calls_train == 0)):
        raise RuntimeError(f"fusion did not run (train {calls_train}, eval {results['fusion_calls_eval']} calls)")
    logger.info("%s %s: %s", cfg.mode, cfg.target_lang, {k: round(v, 4) for k, v in metrics.items()})
    return write_run(cfg, results, test_eval.records(predictions), cfg.prefix)


def with_evaluated_run_identity(argv: list[str]) -> list[str]:
    """``--eval_stage2 RUN_DIR`` needs none of the required flags: they are the run's (its run_config.json), put
    first so that argparse is satisfied; :func:`evaluated_run_args` then takes every setting from the run."""
    run = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--eval_stage2"),
               next((a.split("=", 1)[1] for a in argv if a.startswith("--eval_stage2=")), None))
    config = Path(run) / "run_config.json" if run else None
    if config is None or not config.is_file():
        return argv  # (resolve_config says what is wrong with it)
    try:
        saved = json.loads(config.read_text())["args"]
        identity = ["--task", saved["task"], "--plm", saved["plm"], "--seed", str(saved["seed"]),
                    "--target_lang", saved.get("target_lang") or saved.get("lang") or "en"]
    except (ValueError, KeyError, TypeError):
        return argv
    return [*identity, *argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return stage_main(build_parser, resolve_config, run, with_evaluated_run_identity(argv))


if __name__ == "__main__":
    sys.exit(main())
