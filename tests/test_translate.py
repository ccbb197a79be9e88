"""run_translate.py: projection, dedup/sort/restore order, resume, reference backend, tiny NLLB, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

import run_translate
from flare import translate as tr
from flare.data import load_task
from flare.translate import MARK, TranslateJob, TranslationError, mark_answer, project_answer, run_job

DATA = str(Path(__file__).resolve().parents[1] / "data")  # independent of the working directory


# ---------------------------------------------------------------- QA answer projection
def test_mark_answer_shifts_only_by_quotes_before_the_answer():
    context = 'He said "yes" in 1999 and "no" later.'
    start = context.index("1999")
    marked = mark_answer(context, "1999", start)
    assert marked == 'He said yes in "1999" and no later.'
    # the original subtracted ALL removed quotes (4), also the two after the answer -> wrong span
    clean = context.replace(MARK, "")
    assert clean[start - 4:start - 4 + 4] != "1999" and clean[start - 2:start + 2] == "1999"


def test_project_answer_recovers_span_and_strips_markers():
    ctx, ans, start = project_answer('Alisema ndiyo mwaka "1999" na hapana.')
    assert (ans, start) == ("1999", ctx.index("1999")) and MARK not in ctx
    # a translator that moves the markers and adds spaces inside
    ctx, ans, start = project_answer('Mwaka " 1999 huko " Brazil')
    assert ans == "1999 huko" and ctx[start:start + len(ans)] == ans
    # extra quotes inside the span are removed from answer and context alike
    ctx, ans, start = project_answer('A "b "c" d" e')
    assert ans == "b c d" and ctx == "A b c d e" and ctx[start:start + len(ans)] == ans


@pytest.mark.parametrize("translated", ["no markers at all", 'one " marker', 'empty "" span', 'blank "  " span'])
def test_project_answer_lost(translated):
    ctx, ans, start = project_answer(translated)
    assert (ans, start) == ("", -1) and MARK not in ctx


class FakeTranslator:
    """Upper-cases text (markers survive); records what it was asked to translate."""

    def __init__(self, batch_size=4, fail_after=None, move_markers=False):
        self.batch_size, self.calls, self.fail_after, self.move_markers = batch_size, [], fail_after, move_markers

    def check_code(self, code, role):
        pass

    def token_length(self, text):
        return len(text.split())

    def translate(self, texts, src_code, tgt_code, stats):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(texts))
        return [f"[{tgt_code}] " + t.upper() for t in texts]


def _job(tmp_path, task="nusax", **kw):
    kw = {"source_lang": "en", "target_lang": "jav", "model": "fake", "output_dir": tmp_path, "data_dir": DATA,
          "splits": ("test",), **kw}
    return TranslateJob(task=task, **kw)


def test_dedup_sort_and_restore_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "CHUNK", 1000)
    fake = FakeTranslator()
    run_job(_job(tmp_path, task="xnli", target_lang="es", splits=("test",)), lambda: fake)
    df = pd.read_parquet(tmp_path / "xnli" / "translate-es-fake" / "test_en-es.parquet")
    src = load_task("xnli", "en", "test", DATA)
    assert list(df["premise"]) == list(src["premise"]) and len(df) == 210
    assert list(df["premise_translated"]) == ["[spa_Latn] " + p.upper() for p in src["premise"]]
    asked = [t for call in fake.calls for t in call]
    premises = [t for t in asked if t in set(src["premise"])]
    assert len(premises) == len(set(src["premise"])) == 70  # each XNLI premise appears 3 times: translated once
    lengths = [len(t.split()) for t in asked[: len(premises)]]
    assert lengths == sorted(lengths, reverse=True)  # longest first within the field
    meta = json.loads((tmp_path / "xnli" / "translate-es-fake" / "meta.json").read_text())
    assert meta["splits"]["test_en-es"]["unique_strings"] < meta["splits"]["test_en-es"]["strings"] == 420


def test_resume_after_interruption_gives_identical_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "CHUNK", 16)
    ref = tmp_path / "ref"
    run_job(_job(ref), lambda: FakeTranslator())
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_job(_job(killed), lambda: FakeTranslator(fail_after=7))
    assert not (killed / "nusax" / "translate-jav-fake" / "test_en-jav.parquet").exists()  # nothing half-written
    resumed = FakeTranslator()
    meta = run_job(_job(killed), lambda: resumed)
    assert meta["splits"]["test_en-jav"]["chunks_resumed"] == 7
    n_chunks = -(-meta["splits"]["test_en-jav"]["unique_strings"] // 16)
    assert len(resumed.calls) == n_chunks - 7  # finished chunks are not translated again
    a = (ref / "nusax" / "translate-jav-fake" / "test_en-jav.parquet").read_bytes()
    b = (killed / "nusax" / "translate-jav-fake" / "test_en-jav.parquet").read_bytes()
    assert a == b
    assert not (killed / "nusax" / "translate-jav-fake" / ".partial").exists()


@pytest.mark.parametrize("task,tgt", [("nusax", "jav"), ("xnli", "es")])
def test_shards_then_merge_give_the_file_of_one_process(tmp_path, monkeypatch, task, tgt):
    """run_translate.py --shard I/3 for each I (separate processes in real use, any order): no shard writes a file
    while another's chunks are missing; the last one finds them all and writes the single-process file byte for
    byte. The command without --shard is the merge: it translates only what no shard did."""
    monkeypatch.setattr(tr, "CHUNK", 16)
    name = f"{task}/translate-{tgt}-fake/test_en-{tgt}.parquet"
    run_job(_job(tmp_path / "one", task=task, target_lang=tgt), lambda: FakeTranslator())
    single = (tmp_path / "one" / name).read_bytes()

    def shards(out, order):
        counts = []
        for i in order:
            fake = FakeTranslator()
            run_job(_job(out, task=task, target_lang=tgt, shard=(i, 3)), lambda fake=fake: fake)
            counts.append(sum(len(c) for c in fake.calls))
        return counts

    out = tmp_path / "all-shards"
    counts = shards(out, (2, 0))
    assert not list(out.rglob("*.parquet")) and min(counts) > 0  # each did its part, none wrote a file
    counts += shards(out, (1,))
    assert (out / name).read_bytes() == single
    merge = FakeTranslator()
    meta = run_job(_job(out, task=task, target_lang=tgt), lambda: merge)
    # nothing twice
    assert merge.calls == [] and sum(counts) == meta["splits"][f"test_en-{tgt}"]["unique_strings"]
    assert not (out / task / f"translate-{tgt}-fake" / ".partial").exists()

    out = tmp_path / "one-shard-missing"
    counts = shards(out, (0, 1))
    merge = FakeTranslator()
    meta = run_job(_job(out, task=task, target_lang=tgt), lambda: merge)
    assert sum(len(c) for c in merge.calls) + sum(counts) == meta["splits"][f"test_en-{tgt}"]["unique_strings"]
    assert (out / name).read_bytes() == single


def test_a_shard_outrun_by_its_sibling_ends_cleanly(tmp_path, monkeypatch):
    """Two processes on one translation: while shard 1/2 is translating, a sibling merges every chunk, writes the
    file and removes .partial. The shard must not fail (it did: FileNotFoundError on a removed chunk, exit 2 though
    the output was right, and the sweep then blocked every job that needed the translation); the file is the
    single-process one and no chunk is left behind."""
    monkeypatch.setattr(tr, "CHUNK", 16)
    name = "nusax/translate-jav-fake/test_en-jav.parquet"
    run_job(_job(tmp_path / "one"), lambda: FakeTranslator())
    single = (tmp_path / "one" / name).read_bytes()
    out = tmp_path / "race"
    run_job(_job(out, shard=(0, 2)), lambda: FakeTranslator())  # shard 0's chunks are on disk

    class Outrun(FakeTranslator):
        def translate(self, texts, src_code, tgt_code, stats):
            if not self.calls:  # the sibling merges while this shard translates its first chunk
                run_job(_job(out), lambda: FakeTranslator())
                assert (out / name).is_file() and not (out / "nusax" / "translate-jav-fake" / ".partial").exists()
            return super().translate(texts, src_code, tgt_code, stats)

    run_job(_job(out, shard=(1, 2)), lambda: Outrun())
    assert (out / name).read_bytes() == single
    assert not (out / "nusax" / "translate-jav-fake" / ".partial").exists()


def test_parallel_jobs_keep_each_others_meta_entries(tmp_path):
    """Every language's test set is translated into the one English folder; jobs for several languages (in
    parallel on a node) must all stay in its meta.json: keyed by file, merged under a lock."""
    import multiprocessing

    for lang in ("jav", "sun"):
        assert run_translate.main(["--task", "nusax", "--source_lang", lang, "--target_lang", "en", "--model",
                                   "reference", "--data_dir", DATA, "--output_dir", str(tmp_path), "--splits",
                                   "test"]) == 0
    meta = json.loads((tmp_path / "nusax" / "translate-en-reference" / "meta.json").read_text())
    assert {"test_jav-en", "test_sun-en"} <= set(meta["splits"])
    path = tmp_path / "many" / "meta.json"
    procs = [multiprocessing.get_context("fork").Process(target=tr.update_meta, args=(path, {"task": "x"}, f"k{i}",
                                                                                       {"i": i})) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert json.loads(path.read_text())["splits"] == {f"k{i}": {"i": i} for i in range(8)}


def test_finished_translation_is_skipped(tmp_path):
    run_job(_job(tmp_path), lambda: FakeTranslator())
    t0 = time.time()
    run_job(_job(tmp_path), lambda: pytest.fail("the model must not be loaded again"))
    assert time.time() - t0 < 2


def test_tydiqa_projection_counts_in_meta(tmp_path):
    meta = run_job(_job(tmp_path, task="tydiqa", target_lang="sw", max_samples=20), lambda: FakeTranslator())
    df = pd.read_parquet(tmp_path / "tydiqa" / "translate-sw-fake" / "test_en-sw.parquet")
    entry = meta["splits"]["test_en-sw"]
    assert entry["answers_projected"] == 20 and entry["answers_lost"] == 0
    for ctx, ans in zip(df["context_translated"], df["answers_translated"]):
        assert MARK not in ctx and ctx[ans["answer_start"][0]:].startswith(ans["text"][0])
    assert {"context_translated", "question_translated", "answers_translated", "language"} <= set(df.columns)


# ---------------------------------------------------------------- reference backend
@pytest.mark.parametrize("task,tgt,field", [("nusax", "jav", "text"), ("xnli", "de", "hypothesis")])
def test_reference_reproduces_human_translations(tmp_path, task, tgt, field):
    splits = ("train", "validation", "test") if task == "nusax" else ("validation", "test")
    assert run_translate.main(["--task", task, "--source_lang", "en", "--target_lang", tgt, "--model", "reference",
                               "--data_dir", DATA, "--output_dir", str(tmp_path), "--splits", *splits]) == 0
    for split in splits:
        df = pd.read_parquet(tmp_path / task / f"translate-{tgt}-reference" /
                             f"{tr.SPLIT_FILE[split]}_en-{tgt}.parquet")
        assert list(df[f"{field}_translated"]) == list(load_task(task, tgt, split, DATA)[field])
        assert list(df[field]) == list(load_task(task, "en", split, DATA)[field])
        assert set(df["language"]) == {"en"}


def test_reference_refuses_tydiqa(tmp_path, capsys):
    assert run_translate.main(["--task", "tydiqa", "--source_lang", "en", "--target_lang", "sw", "--model",
                               "reference", "--data_dir", DATA, "--output_dir", str(tmp_path)]) == 2
    assert "TyDiQA is not parallel" in capsys.readouterr().err


# ---------------------------------------------------------------- lexical (statistical) MT backend
def _lexical(out, src, tgt, *extra, data=DATA, model="lexical"):
    assert run_translate.main(["--task", "nusax", "--source_lang", src, "--target_lang", tgt, "--model", model,
                               "--data_dir", str(data), "--output_dir", str(out), *extra]) == 0
    folder = Path(out) / "nusax" / f"translate-{tgt}-{model}"
    return folder, json.loads((folder / "meta.json").read_text())


def test_lexical_mt_files_scores_and_not_the_human_translation(tmp_path):
    """Both directions write the files every stage-2 mode reads; meta.json records the training data and chrF/BLEU
    against the human translation; the output is real MT (far from the human text), punctuation kept."""
    folder, meta = _lexical(tmp_path, "en", "jav")
    for split in ("train", "validation", "test"):
        df = pd.read_parquet(folder / f"{tr.SPLIT_FILE[split]}_en-jav.parquet")
        assert list(df.columns) == ["id", "text", "label", "text_translated", "language"]
        assert list(df["text"]) == list(load_task("nusax", "en", split, DATA)["text"])
        human = list(load_task("nusax", "jav", split, DATA)["text"])
        assert sum(a == b for a, b in zip(df["text_translated"], human)) == 0
        entry = meta["splits"][f"{tr.SPLIT_FILE[split]}_en-jav"]
        assert entry["trained_on"]["split"] == "train" and entry["trained_on"]["training_pairs"] == 500
        assert entry["against_human"]["in_sample"] == (split == "train")
        assert 15 < entry["against_human"]["chrf"] < 60 and 0 <= entry["against_human"]["bleu"] < 20
    back, meta = _lexical(tmp_path, "jav", "en", "--splits", "test")
    df = pd.read_parquet(back / "test_jav-en.parquet")
    assert list(df["text"]) == list(load_task("nusax", "jav", "test", DATA)["text"])
    assert 20 < meta["splits"]["test_jav-en"]["against_human"]["chrf"] < 40  # measured 28.8
    assert meta["model"] == "lexical" and meta["nllb_target"] is None and meta["fallback_warnings"] == []
    # an exclamation mark and a comma survive, and the learned lexicon translates frequent words
    assert df["text_translated"].str.contains("!").any() and df["text_translated"].str.contains(",").any()
    from flare.lexical_mt import LexicalTranslator

    toy = LexicalTranslator(["aku mangan sega", "aku turu", "sega enak"], ["i eat rice", "i sleep", "rice tasty"])
    assert toy.translate_text("Aku mangan, sega!") == "I eat, rice!"
    assert toy.translate_text("wedhus mangan") == "Wedhus eat"  # an unknown word is copied


def test_lexical_mt_learns_from_the_training_split_only(tmp_path):
    """Whatever split it translates, the model reads only the TRAINING pairs: garbling the English validation and
    test files (the human side of jav -> en) changes none of its test translations, only the scores against them."""
    import shutil

    data = tmp_path / "data" / "nusax"
    for lang in ("english", "javanese"):
        shutil.copytree(Path(DATA) / "nusax" / lang, data / lang)
    for split in ("valid", "test"):
        path = data / "english" / f"{split}.csv"
        df = pd.read_csv(path)
        df["text"] = ["zzz " + " ".join(reversed(t.split())) for t in df["text"]]
        df.to_csv(path, index=False)
    clean, meta_clean = _lexical(tmp_path / "a", "jav", "en", "--splits", "validation", "test")
    garbled, meta_garbled = _lexical(tmp_path / "b", "jav", "en", "--splits", "validation", "test",
                                     data=tmp_path / "data")
    for name in ("val_jav-en.parquet", "test_jav-en.parquet"):
        assert pd.read_parquet(clean / name).equals(pd.read_parquet(garbled / name))
    key = "test_jav-en"
    assert meta_garbled["splits"][key]["against_human"]["chrf"] < meta_clean["splits"][key]["against_human"]["chrf"]
    assert "zzz" not in " ".join(pd.read_parquet(garbled / "test_jav-en.parquet")["text_translated"]).lower()


def test_lexical_mt_is_deterministic_across_processes(tmp_path):
    """Two processes with different hash seeds (set and dict order) write byte-identical translations."""
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        subprocess.run([sys.executable, str(Path(run_translate.__file__)), "--task", "nusax", "--source_lang", "sun",
                        "--target_lang", "en", "--model", "lexical", "--data_dir", DATA, "--output_dir", str(out),
                        "--splits", "test"], check=True, env=dict(os.environ, PYTHONHASHSEED=hash_seed),
                       capture_output=True)
        outs.append(pd.read_parquet(out / "nusax" / "translate-en-lexical" / "test_sun-en.parquet"))
    assert outs[0].equals(outs[1])


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["ace", "ban", "bbc", "bjn", "bug", "ind", "jav", "mad", "min", "nij", "sun"])
def test_lexical_mt_every_nusax_language(tmp_path, lang):
    folder, meta = _lexical(tmp_path, "en", lang, "--splits", "test")
    assert 10 < meta["splits"][f"test_en-{lang}"]["against_human"]["chrf"] < 70
    back, meta = _lexical(tmp_path, lang, "en", "--splits", "test")
    assert 10 < meta["splits"][f"test_{lang}-en"]["against_human"]["chrf"] < 70


# ---------------------------------------------------------------- the tiny NLLB model, every task
@pytest.mark.parametrize("task,tgt,cols", [
    ("xnli", "es", ["premise", "hypothesis", "label", "premise_translated", "hypothesis_translated", "language"]),
    ("nusax", "jav", ["id", "text", "label", "text_translated", "language"]),
    ("tydiqa", "sw", ["id", "title", "context", "question", "answers", "context_translated",
                      "question_translated", "answers_translated", "language"]),
])
def test_tiny_nllb_writes_every_task(tmp_path, tiny_models, task, tgt, cols):
    splits = ["validation", "test"] if task != "tydiqa" else ["train", "test"]
    argv = ["--task", task, "--source_lang", "en", "--target_lang", tgt, "--model", str(tiny_models / "nllb"),
            "--data_dir", DATA, "--output_dir", str(tmp_path), "--max_samples", "6", "--max_length", "24",
            "--splits", *splits]
    assert run_translate.main(argv) == 0
    folder = tmp_path / task / f"translate-{tgt}-nllb"
    for split in splits:
        df = pd.read_parquet(folder / f"{tr.SPLIT_FILE[split]}_en-{tgt}.parquet")
        assert list(df.columns) == cols and len(df) == 6
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["nllb_target"] == {"es": "spa_Latn", "jav": "jav_Latn", "sw": "swh_Latn"}[tgt]
    assert set(meta["splits"]) == {f"{tr.SPLIT_FILE[s]}_en-{tgt}" for s in splits}


# ---------------------------------------------------------------- bad input
def _bad(tmp_path, capsys, *argv):
    out = tmp_path / "out"
    assert run_translate.main([*argv, "--output_dir", str(out), "--data_dir", DATA]) == 2
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True
    return capsys.readouterr().err


def test_unknown_language(tmp_path, capsys):
    assert "unknown language 'xx'" in _bad(tmp_path, capsys, "--task", "nusax", "--source_lang", "en",
                                           "--target_lang", "xx", "--model", "reference")


def test_model_dir_without_tokenizer(tmp_path, capsys, tiny_models):
    import shutil

    model = tmp_path / "notok"
    model.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_models / "nllb" / f).exists():
            shutil.copy(tiny_models / "nllb" / f, model / f)
    err = _bad(tmp_path, capsys, "--task", "nusax", "--source_lang", "en", "--target_lang", "jav", "--model",
               str(model), "--splits", "test")
    assert "could not load its tokenizer" in err


def test_not_a_translation_model(tmp_path, capsys, tiny_models):
    err = _bad(tmp_path, capsys, "--task", "nusax", "--source_lang", "en", "--target_lang", "jav", "--model",
               str(tiny_models / "llama"), "--splits", "test")
    assert "translation needs an NLLB/M2M100" in err


def test_no_fallback_for_madurese(tmp_path, capsys, tiny_models):
    err = _bad(tmp_path, capsys, "--task", "nusax", "--source_lang", "en", "--target_lang", "mad", "--model",
               str(tiny_models / "nllb"), "--no_fallback", "--splits", "test")
    assert "NLLB has no madurese" in err


def test_fallback_is_loud_and_recorded(tmp_path, caplog):
    meta = run_job(_job(tmp_path, target_lang="mad"), lambda: FakeTranslator())
    assert meta["nllb_target"] == "ind_Latn" and "Indonesian" in meta["fallback_warnings"][0]
    assert "!!! NLLB has no madurese" in caplog.text


def test_language_the_model_cannot_read(tiny_models):
    translator = tr.NLLBTranslator(str(tiny_models / "nllb"))
    with pytest.raises(TranslationError, match="cannot read xxx_Latn"):
        translator.check_code("xxx_Latn", "source")


def test_empty_strings_are_not_translated(tmp_path, monkeypatch):
    fake = FakeTranslator()
    stats = tr.Stats()
    out = tr.translate_unique(fake, ["a b", "", "  ", "a b"], "eng_Latn", "jav_Latn", tmp_path / "p", stats)
    assert out == {"a b": "[jav_Latn] A B", "": "", "  ": ""} and stats.empty == 2 and stats.unique == 1


def test_xnli_local_train_split_message(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "--task", "xnli", "--source_lang", "en", "--target_lang", "es", "--model",
               "reference")
    assert "--train_split validation" in err or "no local train split" in err


def test_run_translate_sh_both_directions(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TASKS": "nusax", "TARGET_LANGS": "jav sun", "MODEL": "reference", "DATA_DIR": DATA,
           "OUTPUT_DIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "run_translate.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for lang in ("jav", "sun"):
        for split in ("train", "val", "test"):
            assert (tmp_path / "nusax" / f"translate-{lang}-reference" / f"{split}_en-{lang}.parquet").is_file()
        assert (tmp_path / "nusax" / "translate-en-reference" / f"test_{lang}-en.parquet").is_file()


def test_mt_quality_levels_mix_lexical_and_human_rows_by_a_seeded_hash(tmp_path):
    """`--model lexical-qNN` (issue 29, the MT-quality curve): NN % of the rows take the lexical translation, the
    others the human one, chosen by a hash of the row id: nested (every row lexical at q25 is lexical at q50),
    reproducible, recorded in meta.json with the level's own chrF, which falls as the level rises."""
    from flare.lexical_mt import is_offline_mt, mix_fraction, takes_lexical

    assert mix_fraction("lexical-q25") == 0.25 and mix_fraction("lexical") is None
    assert mix_fraction("lexical-q0") is None and mix_fraction("lexical-q100") is None
    assert is_offline_mt("lexical-q50") and not is_offline_mt("nllb-600m")
    ids = [str(i) for i in range(2000)]
    share = {q: sum(takes_lexical(i, q) for i in ids) / len(ids) for q in (0.25, 0.5, 0.75)}
    assert all(abs(share[q] - q) < 0.04 for q in share)
    assert all(takes_lexical(i, 0.5) for i in ids if takes_lexical(i, 0.25))  # nested levels

    human = list(load_task("nusax", "en", "test", DATA)["text"])
    lexical = pd.read_parquet(_lexical(tmp_path, "jav", "en", "--splits", "test")[0] / "test_jav-en.parquet")
    chrf = {}
    for q in (25, 75):
        folder, meta = _lexical(tmp_path, "jav", "en", "--splits", "test", model=f"lexical-q{q}")
        assert folder.name == f"translate-en-lexical-q{q}"
        df = pd.read_parquet(folder / "test_jav-en.parquet")
        chosen = [takes_lexical(str(i), q / 100) for i in df["id"]]
        assert list(df["text_translated"]) == [lex if c else h for lex, h, c in
                                               zip(lexical["text_translated"], human, chosen)]
        entry = meta["splits"]["test_jav-en"]
        assert entry["mix"]["rows_lexical"] == sum(chosen) and entry["mix"]["fraction"] == q / 100
        chrf[q] = entry["against_human"]["chrf"]
    assert chrf[25] > chrf[75] > 28  # between the human translation (100) and the lexical MT (28.8)


def test_lexical_mt_translates_tydiqa_indonesian_from_nusax_pairs_and_projects_every_answer(tmp_path, capsys):
    """Issue 32: TyDiQA is not parallel, so its lexical MT learns from NusaX's English-Indonesian TRAINING pairs;
    the answer markers survive the word-by-word translation and every projected answer is the translated context's
    text at its start; meta.json says what the MT learned from (no human translation to score against), in the
    canonical folder (id -> ind) that run.py reads; other TyDiQA languages are refused with the ones it can do."""
    assert run_translate.main(["--task", "tydiqa", "--source_lang", "en", "--target_lang", "id", "--model",
                               "lexical", "--data_dir", DATA, "--output_dir", str(tmp_path)]) == 0
    folder = tmp_path / "tydiqa" / "translate-ind-lexical"
    meta = json.loads((folder / "meta.json").read_text())
    train = meta["splits"]["train_en-ind"]
    assert train["trained_on"]["task"] == "nusax" and train["trained_on"]["translates"] == "tydiqa"
    assert train["against_human"] is None and train["answers_lost"] == 0 and train["answers_projected"] == 900
    df = pd.read_parquet(folder / "train_en-ind.parquet")
    for ctx, ans in zip(df["context_translated"], df["answers_translated"]):
        start, text = int(ans["answer_start"][0]), str(ans["text"][0])
        assert ctx[start:start + len(text)] == text and text and '"' not in ctx  # markers gone, span exact
    assert (df["context_translated"] != df["context"]).all()  # translated, not copied
    assert run_translate.main(["--task", "tydiqa", "--source_lang", "id", "--target_lang", "en", "--model",
                               "lexical", "--data_dir", DATA, "--output_dir", str(tmp_path), "--splits", "test"]) == 0
    assert (tmp_path / "tydiqa" / "translate-en-lexical" / "test_ind-en.parquet").is_file()
    capsys.readouterr()
    assert run_translate.main(["--task", "tydiqa", "--source_lang", "en", "--target_lang", "sw", "--model",
                               "lexical", "--data_dir", DATA, "--output_dir", str(tmp_path)]) == 2
    assert "nusax training pairs, which have no sw" in capsys.readouterr().err
    assert run_translate.main(["--task", "tydiqa", "--source_lang", "en", "--target_lang", "id", "--model",
                               "lexical-q50", "--data_dir", DATA, "--output_dir", str(tmp_path / "q")]) == 2
    assert "does not have; use --model lexical" in capsys.readouterr().err
