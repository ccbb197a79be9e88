"""Bad input, as a user meets it: each script run as a process. Every case must exit 2 with one ``error:`` line that
names the problem and the fix (no traceback), before any model is loaded where the input can be checked, and leave
nothing half-written: no run directory, no results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flare import stage1
from flare.translate import TranslateJob, run_job

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data")
FAST = ["--data_dir", DATA, "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "2",
        "--batch_size", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def ready(tmp_path_factory, tiny_models):
    """A stage-1 run, a stage-2 run, reference translations, and broken copies of them."""
    root = tmp_path_factory.mktemp("bad")
    xlmr = str(tiny_models / "xlm-roberta")
    assert stage1.main(["--task", "nusax", "--plm", xlmr, "--output_dir", str(root / "ck"), *FAST]) == 0
    s1 = root / "ck" / "nusax-en-xlm-roberta-3"
    tr = root / "tr"
    for src, tgt in (("en", "jav"), ("jav", "en"), ("en", "sun")):
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=tr, data_dir=DATA))
    from flare import stage2

    assert stage2.main(["--task", "nusax", "--plm", xlmr, "--target_lang", "jav", "--load_ckpt", str(s1),
                        "--output_dir", str(root / "ck"), "--adapter", "lora", "--translate-train", "--path_mt",
                        str(tr / "nusax" / "translate-jav-reference"), *FAST]) == 0
    s2 = next(p for p in (root / "ck").iterdir() if p.name.endswith("-ttrain"))
    # broken copies
    trunc = root / "truncated"
    trunc.mkdir()
    for f in s1.iterdir():
        if f.is_file():
            (trunc / f.name).write_bytes(f.read_bytes())
    data = (s1 / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = root / "badjson"
    bad_json.mkdir()
    (bad_json / "run_config.json").write_text("{not json")
    corrupt = root / "tr-corrupt" / "nusax"
    corrupt.mkdir(parents=True)
    for d in ("translate-jav-reference", "translate-en-reference"):
        (corrupt / d).mkdir()
        for f in (tr / "nusax" / d).iterdir():
            (corrupt / d / f.name).write_bytes(f.read_bytes())
    victim = next((corrupt / "translate-jav-reference").glob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:100])
    other = root / "tr-other" / "nusax"  # a folder whose meta.json says it holds XNLI translations
    for d in ("translate-jav-reference", "translate-en-reference"):
        (other / d).mkdir(parents=True)
        for f in (tr / "nusax" / d).iterdir():
            (other / d / f.name).write_bytes(f.read_bytes())
        meta = json.loads((other / d / "meta.json").read_text())
        (other / d / "meta.json").write_text(json.dumps(meta | {"task": "xnli"}))
    a_file = root / "a-file"
    a_file.write_text("not a folder")
    return dict(root=root, xlmr=xlmr, llama=str(tiny_models / "llama"), nllb=str(tiny_models / "nllb"), s1=s1, s2=s2,
                tr=tr / "nusax", other=other, trunc=trunc, bad_json=bad_json, corrupt=corrupt, a_file=a_file)


def stage2_train(r, path_mt=None, load=None, plm=None):
    return ["run.py", "--task", "nusax", "--plm", plm or r["xlmr"], "--target_lang", "jav",
            "--load_ckpt", str(load or r["s1"]), "--adapter", "lora", "--translate-train",
            "--path_mt", str(path_mt or r["tr"] / "translate-jav-reference"), *FAST]


# (name, argv builder, words the error must contain)
CASES = [
    # run_task_ft.py
    ("stage1: unknown model", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", "no-such-model", *FAST],
     ["unknown --plm", "local model directory"]),
    ("stage1: language without task data", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"],
                                                      "--lang", "sw", *FAST], ["sw"]),
    ("stage1: zero epochs", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"], *FAST,
                                       "--epochs", "0"], ["--epochs must be positive"]),
    ("stage1: score mode on an encoder", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"], *FAST,
                                                    "--eval_mode", "score"], ["--eval_mode score", "drop"]),
    ("stage1: translation model as task model", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["nllb"],
                                                           *FAST], ["translation model"]),
    ("stage1: output dir is a file", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"], *FAST,
                                                "--output_dir", str(r["a_file"])], ["--output_dir", "not a folder"]),
    ("stage1: output dir under a file", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"], *FAST,
                                                   "--output_dir", str(r["a_file"] / "sub")],
     ["--output_dir", "not a folder"]),
    ("stage1: load_ckpt of a stage-2 run", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"],
                                                      *FAST, "--load_ckpt", str(r["s2"]), "--eval_only"],
     ["stage-2 run", "nusax-en-xlm-roberta-3"]),
    ("stage1: unparseable run_config.json", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"],
                                                       *FAST, "--load_ckpt", str(r["bad_json"]), "--eval_only"],
     ["run_config.json", "not valid JSON"]),
    # run.py
    ("stage2: no load_ckpt", lambda r: [a for a in stage2_train(r) if a not in ("--load_ckpt", str(r["s1"]))],
     ["--load_ckpt is required", "run_task_ft.py"]),
    ("stage2: load_ckpt missing", lambda r: stage2_train(r, load=r["root"] / "nope"), ["no such run directory"]),
    ("stage2: load_ckpt of a stage-2 run", lambda r: stage2_train(r, load=r["s2"]),
     ["stage-2 run", "nusax-en-xlm-roberta-3"]),
    ("stage2: load_ckpt of another model", lambda r: stage2_train(r, plm=r["llama"]), ["was trained for", "llama"]),
    ("stage2: truncated adapter file", lambda r: stage2_train(r, load=r["trunc"]),
     ["adapter_model.safetensors", "truncated or corrupt", "run_task_ft.py"]),
    ("stage2: corrupted parquet", lambda r: stage2_train(r, path_mt=r["corrupt"] / "translate-jav-reference"),
     ["parquet", "--overwrite"]),
    ("stage2: translations of another language",
     lambda r: stage2_train(r, path_mt=r["tr"] / "translate-sun-reference"), ["sun", "jav"]),
    ("stage2: translations of another task", lambda r: stage2_train(r, path_mt=r["other"] / "translate-jav-reference"),
     ["holds xnli translations", "translations/nusax/translate-jav-reference"]),
    ("stage2: target language the task lacks", lambda r: ["run.py", "--task", "xnli", *stage2_train(r)[3:]],
     ["task 'xnli' has no language 'jav'"]),
    ("stage2: missing translation folder", lambda r: stage2_train(r, path_mt=r["root"] / "nowhere" / "x"),
     ["run_translate.py"]),
    ("stage2: two modes", lambda r: [*stage2_train(r), "--fusion_fn", "add", "--input_fusion"],
     ["two different methods"]),
    ("stage2: fuse_mt without mt_model", lambda r: [*stage2_train(r), "--fusion_fn", "add", "--fuse_mt"],
     ["--mt_model"]),
    ("stage2: unknown MT model", lambda r: [*stage2_train(r), "--fusion_fn", "add", "--fuse_mt", "--mt_model",
                                            "no-such-mt"], ["unknown --mt_model 'no-such-mt'"]),
    ("stage2: mt_model without fuse_mt", lambda r: [*stage2_train(r), "--mt_model", r["nllb"]], ["--fuse_mt"]),
    ("stage2: eval_only with a training mode", lambda r: [*stage2_train(r), "--eval_only"], ["drop --eval_only"]),
    ("stage2: translate-test without translations", lambda r: ["run.py", "--task", "nusax", "--plm", r["xlmr"],
                                                               "--target_lang", "jav", "--load_ckpt", str(r["s1"]),
                                                               "--translate-test", *FAST], ["--path_mt"]),
    ("stage2: heads do not divide the rank", lambda r: [*stage2_train(r), "--fusion_fn", "cross-attention",
                                                        "--cross_attention_heads", "3"], ["divide --lora_r"]),
    ("stage2: cache without fusion", lambda r: [*stage2_train(r), "--cache_source_states"], ["--fusion_fn"]),
    ("stage2: target modules without the fusion targets", lambda r: [*stage2_train(r), "--fusion_fn", "add",
                                                                     "--target_modules", "query", "key"],
     ["lacks the fusion targets", "value"]),
    ("stage2: exact merge into a 4-bit base", lambda r: [*stage2_train(r), "--stage1_merge", "exact",
                                                         "--quantize", "4bit"], ["--stage1_merge none"]),
    ("stage2: no mode", lambda r: ["run.py", "--task", "nusax", "--plm", r["xlmr"], "--target_lang", "jav",
                                   "--load_ckpt", str(r["s1"]), *FAST], ["no mode selected"]),
    ("stage2: target language = source language", lambda r: [*stage2_train(r)[:6], "en", *stage2_train(r)[7:]],
     ["is the source language"]),
    ("stage2: resume without a checkpoint", lambda r: [*stage2_train(r), "--resume_from_checkpoint", "last"],
     ["no complete checkpoint to resume", "drop the flag"]),
    ("stage2: resume from a missing folder", lambda r: [*stage2_train(r), "--resume_from_checkpoint",
                                                        str(r["root"] / "ck" / "checkpoint-99")],
     ["not a complete checkpoint folder"]),
    ("stage1: max_length too small for the prompt", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm",
                                                               r["llama"], *FAST, "--max_length", "12"],
     ["--max_length 12 is too small", "template"]),
    ("stage1: zero max_length", lambda r: ["run_task_ft.py", "--task", "nusax", "--plm", r["xlmr"], *FAST,
                                           "--max_length", "0"], ["--max_length must be positive"]),
    ("stage2: negative batch size", lambda r: [*stage2_train(r), "--batch_size", "-4"],
     ["--batch_size must be positive"]),
    ("stage2: zero LoRA rank", lambda r: [*stage2_train(r), "--lora_r", "0"], ["--lora_r must be positive"]),
    ("translate: zero batch size", lambda r: ["run_translate.py", "--task", "nusax", "--source_lang", "en",
                                              "--target_lang", "jav", "--model", "reference", "--batch_size", "0",
                                              "--output_dir", str(r["root"] / "tr-new"), "--data_dir", DATA],
     ["--batch_size must be positive"]),
    ("translate: bad shard", lambda r: ["run_translate.py", "--task", "nusax", "--source_lang", "en",
                                        "--target_lang", "jav", "--model", "reference", "--shard", "3/3",
                                        "--output_dir", str(r["root"] / "tr-new"), "--data_dir", DATA],
     ["--shard 3/3", "0 <= I < N"]),
    # run_translate.py
    ("translate: unknown MT model", lambda r: ["run_translate.py", "--task", "nusax", "--source_lang", "en",
                                               "--target_lang", "jav", "--model", "no-such-mt",
                                               "--output_dir", str(r["root"] / "tr-new"), "--data_dir", DATA],
     ["unknown --model 'no-such-mt'"]),  # the flag typed, not --plm
    ("translate: unknown language", lambda r: ["run_translate.py", "--task", "nusax", "--source_lang", "en",
                                               "--target_lang", "klingon", "--model", "reference",
                                               "--output_dir", str(r["root"] / "tr-new"), "--data_dir", DATA],
     ["klingon"]),
    # the sweep
    ("sweep: unknown model", lambda r: ["-m", "flare.sweep", "--task", "nusax", "--plm", "no-such-model", "--langs",
                                        "jav", "--output_dir", str(r["root"] / "sweep-out"), "--dry_run"],
     ["unknown --plm"]),
    ("sweep: unknown MT model", lambda r: ["-m", "flare.sweep", "--task", "nusax", "--plm", r["xlmr"], "--langs",
                                           "jav", "--mt", "no-such-mt", "--output_dir", str(r["root"] / "sweep-out"),
                                           "--dry_run"], ["unknown --mt 'no-such-mt'"]),
    ("sweep: GPUs on a machine without any", lambda r: ["-m", "flare.sweep", "--task", "nusax", "--plm", r["xlmr"],
                                                        "--langs", "jav", "--output_dir", str(r["root"] / "sweep-out"),
                                                        "--gpus", "0,1"], ["no CUDA GPU", "drop --gpus"]),
    ("sweep: Slurm flags without the launcher", lambda r: ["-m", "flare.sweep", "--task", "nusax", "--plm", r["xlmr"],
                                                           "--langs", "jav", "--partition", "gpu",
                                                           "--output_dir", str(r["root"] / "sweep-out")],
     ["add --launcher slurm"]),
    ("sweep: Slurm without submitit installed",
     lambda r: ["-c", "import sys; sys.modules['submitit'] = None; from flare import sweep; sys.exit(sweep.main("
                f"['--task', 'nusax', '--plm', {r['xlmr']!r}, '--langs', 'jav', '--launcher', 'slurm', "
                f"'--output_dir', {str(r['root'] / 'sweep-out')!r}]))"], ["pip install submitit"]),
    ("sweep: unknown language", lambda r: ["-m", "flare.sweep", "--task", "nusax", "--plm", r["xlmr"], "--langs",
                                           "klingon", "--output_dir", str(r["root"] / "sweep-out"), "--dry_run"],
     ["klingon"]),
]


def run_case(argv: list[str], out: Path) -> subprocess.CompletedProcess:
    if argv[0] in ("run.py", "run_task_ft.py") and "--output_dir" not in argv:
        argv = [*argv, "--output_dir", str(out)]  # where a run would go if a check failed to stop it
    cmd = [sys.executable, *(argv if argv[0] in ("-m", "-c") else [str(REPO / argv[0]), *argv[1:]])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")  # no GPU, wherever the tests run
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_every_bad_input_is_one_clear_error_and_writes_nothing(ready):
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
    before = snapshot(ready["root"])
    with ThreadPoolExecutor(max_workers=2) as pool:  # the processes mostly import; two at a time on 2 cores
        procs = list(pool.map(lambda case: run_case(case[1](ready), ready["root"] / "out"), CASES))
    problems = []
    for (name, _, words), proc in zip(CASES, procs):
        err = proc.stderr
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        if proc.returncode != 2 or "Traceback" in err or not lines or not all(w in err for w in words):
            problems.append(f"{name}: exit {proc.returncode}, error lines {lines[:1]}, wanted {words}\n"
                            f"{err[-1500:]}")
    assert not problems, "\n\n".join(problems)
    assert snapshot(ready["root"]) == before  # nothing written anywhere (no run directory, no results, no logs)

