"""Translate task data with NLLB (or a human-parallel reference) for FLARE (see flare.translate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flare.config import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Translate task data: English train/val into the target language and "
                                            "target test data into English, with QA answer projection.")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="task")
    p.add_argument("--source_lang", required=True, help="language of the data to translate (e.g. en)")
    p.add_argument("--target_lang", required=True, help="language to translate into (e.g. es, jav)")
    p.add_argument("--model", required=True,
                   help="nllb-600m, nllb-3.3b, a local NLLB/M2M100 directory, 'reference' (the human "
                        "translations of the parallel NusaX / XNLI corpus: oracle MT, offline) or 'lexical' (a "
                        "word-level statistical MT, IBM Model 1, trained on the parallel TRAINING split only: weak "
                        "real MT, offline; see flare.lexical_mt) or 'lexical-qNN' (an MT quality level between "
                        "the two: NN %% of the rows, chosen by a seeded hash of the row id, lexical, the rest "
                        "human; NN 1-99)")
    p.add_argument("--max_length", type=int, default=256,
                   help="max tokens of an input (longer ones are truncated and counted) and of an output "
                        "(the original's default was 128; its run_translate.sh used 256, and 768 for TyDiQA)")
    p.add_argument("--batch_size", type=int, default=64, help="strings per generation batch")
    p.add_argument("--output_dir", default="translations", help="root: {output_dir}/{task}/translate-{tgt}-{model}/")
    p.add_argument("--save_format", default="parquet", choices=["parquet"], help="output format (parquet only)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="device (auto: cuda if any)")
    p.add_argument("--path_train", default=None,
                   help="TyDiQA: parquet file with the training rows to translate (columns as load_task gives, "
                        "optionally a 'lang' column that is filtered on --source_lang) instead of the loader")
    p.add_argument("--path_test", default=None, help="TyDiQA: the same for the test rows")
    p.add_argument("--data_dir", default=None, help="local data root in the layout of data/ (default: the hub)")
    p.add_argument("--splits", nargs="+", default=None, choices=["train", "validation", "test"],
                   help="splits to translate (default: train validation test; TyDiQA train test)")
    p.add_argument("--max_samples", type=int, default=None, help="translate only the first N rows of each split")
    p.add_argument("--num_beams", type=int, default=1, help="beam size (default greedy, as the original)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights on a GPU")
    p.add_argument("--overwrite", action="store_true", help="redo files that already exist")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="translate only shard I of N (0-based; e.g. 0/4 ... 3/4 on four GPUs, one process each); "
                        "then the same command without --shard merges: it writes the files from the shards' chunks, "
                        "identical to one process's")
    p.add_argument("--no_fallback", action="store_true",
                   help="refuse languages NLLB lacks (bbc, mad, nij) instead of translating them as Indonesian")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flare.common_args import setup_logging

    setup_logging()
    from flare.common_args import UsageError, fail, resolve_device
    from flare.errors import FlareError
    from flare.languages import check_task_language, resolve
    from flare.lexical_mt import is_offline_mt
    from flare.stages import check_output_dir

    if (args.path_train or args.path_test) and args.task != "tydiqa":
        return fail("--path_train/--path_test are for TyDiQA parquet inputs; use --data_dir for the other tasks")
    try:  # the flags first, before the MT code (torch, transformers) is imported
        check_task_language(args.task, args.source_lang)
        resolve(args.target_lang)
        check_output_dir(args.output_dir)
        for name in ("max_length", "batch_size", "num_beams", "max_samples"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise UsageError(f"--{name} must be positive")
        if not is_offline_mt(args.model):  # an MT model: known before any data is read
            from flare.config import resolve_translation_model

            resolve_translation_model(args.model, "--model")
        shard = None
        if args.shard is not None:
            try:
                i, n = (int(x) for x in args.shard.split("/"))
            except ValueError:
                i, n = -1, 0
            if not 0 <= i < n:
                raise UsageError(f"--shard {args.shard}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
            shard = (i, n)
        from flare.translate import TranslateJob, run_job

        job = TranslateJob(
            task=args.task, source_lang=args.source_lang, target_lang=args.target_lang, model=args.model,
            output_dir=Path(args.output_dir), data_dir=args.data_dir,
            splits=tuple(args.splits) if args.splits else None, max_samples=args.max_samples,
            max_length=args.max_length, batch_size=args.batch_size, num_beams=args.num_beams,
            device="cpu" if is_offline_mt(args.model) else resolve_device(args.device),  # no torch
            bf16=args.bf16, overwrite=args.overwrite,
            no_fallback=args.no_fallback,
            parquet_inputs={s: p for s, p in (("train", args.path_train), ("test", args.path_test)) if p},
            shard=shard,
        )
        run_job(job)
    except (FlareError, ValueError, FileNotFoundError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
