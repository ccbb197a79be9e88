"""Flags and checks shared by run_task_ft.py and run.py (same names and meanings as the original)."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

from flare.config import MODEL_SPECS, TASKS
from flare.errors import FlareError, UsageError  # noqa: F401 (re-exported)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="task")
    p.add_argument("--plm", required=True,
                   help=f"model key ({', '.join(MODEL_SPECS)}) or a local Hugging Face model directory")
    p.add_argument("--seed", type=int, required=True, help="random seed (torch, numpy, Trainer)")
    p.add_argument("--max_length", type=int, default=None,
                   help="token length of inputs; default per task: xnli 128, nusax 128, tydiqa 384 "
                        "(the original used 128 for every task)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    p.add_argument("--batch_size", type=int, default=32, help="per-device train and eval batch size")
    p.add_argument("--epochs", type=int, default=10, help="epochs (used to derive max_steps)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="training steps; default len(train) * epochs // batch_size // gradient_accumulation_steps")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--eval_accumulation_steps", type=int, default=20,
                   help="accepted for compatibility with the original; evaluation here always moves each batch's "
                        "predictions to the CPU at once (the most memory-saving setting)")
    p.add_argument("--generate_max_tokens", type=int, default=100,
                   help="max new tokens when decoders generate (classification uses at most label length + 2)")
    p.add_argument("--output_dir", default="checkpoints", help="root of the run directories")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="device (auto: cuda if any)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (4-bit compute dtype bf16); GPUs with native bf16 (Ampere or newer) "
                        "or CPUs with avx512_bf16/amx")
    p.add_argument("--fp16", action="store_true",
                   help="fp16 mixed precision with loss scaling (4-bit compute dtype fp16), for GPUs without native "
                        "bf16 (V100, T4); without --bf16/--fp16 a GPU trains in fp32, with TF32 matmuls on Ampere+")
    p.add_argument("--eval_only", action="store_true", help="skip training (with --load_ckpt: evaluate a saved run)")
    p.add_argument("--optim", default=None,
                   help="HF optimizer name; default adamw_torch, adamw_bnb_8bit for quantised decoders on a GPU")
    p.add_argument("--wandb_project", default="flare", help="wandb project (only with --report_to wandb)")
    p.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard"],
                   help="experiment tracker (never required)")
    p.add_argument("--adapter", default="lora", help="adapter type; only lora exists")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout (the original fixed 0.0)")
    p.add_argument("--target_modules", nargs="+", default=None,
                   help="LoRA target modules; default from the model table (XLM-R query value; decoders all linear)")
    p.add_argument("--quantize", default=None, choices=["4bit", "8bit", "none"],
                   help="bitsandbytes quantisation; default from the model table (4bit for the 8-9B decoders)")
    p.add_argument("--freeze_lm_head", action="store_true",
                   help="decoders: keep lm_head frozen (the original trains it: ~0.5-0.9B parameters)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--data_dir", default=None,
                   help="local data root in the layout of data/ (default: the Hugging Face hub copies)")
    p.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max_eval_samples", type=int, default=None,
                   help="use only the first N validation and test examples")
    p.add_argument("--doc_stride", type=int, default=128, help="encoder QA: overlap between context windows")
    p.add_argument("--max_answer_length", type=int, default=30, help="encoder QA: longest answer in tokens")
    p.add_argument("--save_total_limit", type=int, default=2, help="Trainer checkpoints kept (best + last)")
    p.add_argument("--group_by_length", action="store_true",
                   help="train on batches of similar length (HF LengthGroupedSampler): less padding, faster; "
                        "off = uniform shuffling, as the original")
    p.add_argument("--num_evals", type=int, default=10,
                   help="validations (and checkpoints) per run, evenly spaced; the best one is kept (original: 10)")
    p.add_argument("--parse", default="first", choices=["first", "strict"],
                   help="decoders, classification: how a generated answer becomes a label. first: the first label "
                        "word in the output (case and punctuation ignored); strict: the original's rule (XNLI: the "
                        "whole output is the label word; NusaX: its last token is)")
    p.add_argument("--eval_mode", default="generate", choices=["generate", "score"],
                   help="decoders, classification: generate = greedy generation parsed by --parse (the original); "
                        "score = rank the label words by likelihood (one forward pass when each is one token)")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="resume training from a checkpoint-* folder, or 'last' for the newest complete one in the run "
                        "dir (one cut mid-save is skipped and moved aside)")


def check_eval_mode(eval_mode: str, family: str, task: str) -> None:
    if eval_mode == "score" and (family != "decoder" or TASKS[task].kind != "cls"):
        raise UsageError(f"--eval_mode score ranks label words, for decoders on classification tasks; {task} with "
                         f"a {family} model has no label words to rank: drop --eval_mode score")


def resolve_device(device: str) -> str:
    """cpu, cuda, or under ``torchrun`` / ``accelerate launch`` (``LOCAL_RANK`` set) ``cuda:LOCAL_RANK``: each rank
    places its model (quantised or not) and the FLARE MT encoder on its own GPU, never all on GPU 0."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu (or auto)")
    if device == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        rank = int(os.environ["LOCAL_RANK"])
        if rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {rank} but only {torch.cuda.device_count()} GPU(s) are visible; start at "
                             "most one process per GPU (torchrun --nproc_per_node)")
        return f"cuda:{rank}"
    return device


def world_size() -> int:
    """Processes of a distributed run (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: str) -> None:
    """Under ``torchrun`` / ``accelerate launch``, an evaluation-only run (zero-shot, translate-test, --eval_only)
    joins the process group, as a training run's Trainer does, so its evaluation is sharded across the ranks and
    gathered in order (:meth:`flare.evaluation.Evaluator.predict`) instead of every rank evaluating everything."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def is_main_process() -> bool:
    """Rank 0 of a distributed run (``torchrun``/``accelerate launch`` set ``RANK``), or a plain run: the process
    that writes results, predictions, adapters and ``run_config.json``."""
    return int(os.environ.get("RANK", "0")) == 0


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); emulated bf16 would be slow and is refused."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_bf16(bf16: bool, device: str, fp16: bool = False) -> None:
    """--bf16 only where bf16 is native, --fp16 only on a GPU, not both."""
    if bf16 and fp16:
        raise UsageError("--bf16 and --fp16 exclude each other; pass one (bf16 on Ampere or newer, fp16 on V100/T4)")
    if fp16 and not device.startswith("cuda"):
        raise UsageError("--fp16 needs a GPU (mixed precision with loss scaling); drop --fp16 to train in fp32")
    if not bf16:
        return
    import torch

    # is_bf16_supported() alone also counts bf16 that the GPU only emulates (V100, T4): slow, and not what was asked
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UsageError("--bf16: this GPU has no native bf16 (it would only be emulated); use --fp16 instead")
    if device == "cpu" and not cpu_has_bf16():
        raise UsageError("--bf16: this CPU has no native bf16 (avx512_bf16/amx); drop --bf16 to train in fp32")


class _Expected(logging.Filter):
    """Drops log records that look like faults but are expected here (see ``setup_logging``)."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


def setup_logging() -> None:
    """INFO logging for the entry points, without messages that are expected: bitsandbytes' notice that the optional
    ``kernels`` package (its faster CPU 4-bit kernels from the hub) is not installed; every 4-bit path works
    without it, and it is printed at import even when no 4-bit model is used; transformers' deprecation notice
    for peft's use of ``is_gradient_checkpointing`` (peft's code, not ours)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _Expected) for f in bnb.filters):
        bnb.addFilter(_Expected("kernels-community", "pip install kernels"))


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
