"""The three task loaders on the real shipped files and on in-memory datasets of the exact hub schemas."""

from __future__ import annotations

import collections
import json

import datasets
import pytest

from flare.data import DataFormatError, load_task
from flare.data import common as data_common
from flare.languages import LANGUAGES, nllb_code, resolve, task_languages


def spans_match(ds) -> bool:
    return all(
        ctx[s:s + len(t)] == t
        for ctx, ans in zip(ds["context"], ds["answers"])
        for t, s in zip(ans["text"], ans["answer_start"])
    )


# ---------------------------------------------------------------- real files
def test_nusax_jav_test(data_dir):
    ds = load_task("nusax", "jav", "test", data_dir=data_dir)
    assert len(ds) == 400
    assert ds.column_names == ["id", "text", "label"]
    assert set(ds["label"]) == {0, 1, 2}


@pytest.mark.parametrize("lang", task_languages("nusax"))
@pytest.mark.parametrize("split,n", [("train", 500), ("validation", 100), ("test", 400)])
def test_nusax_every_language_split(data_dir, lang, split, n):
    assert len(load_task("nusax", lang, split, data_dir=data_dir)) == n


def test_nusax_is_parallel_by_id(data_dir):
    en = load_task("nusax", "en", "test", data_dir=data_dir)
    jv = load_task("nusax", "javanese", "test", data_dir=data_dir)
    assert en["id"] == jv["id"] and en["label"] == jv["label"]


def test_xnli_es_test_balanced(data_dir):
    ds = load_task("xnli", "es", "test", data_dir=data_dir)
    assert len(ds) == 210
    assert collections.Counter(ds["label"]) == {0: 70, 1: 70, 2: 70}
    assert ds.column_names == ["premise", "hypothesis", "label"]


@pytest.mark.parametrize("lang", task_languages("xnli"))
def test_xnli_every_language(data_dir, lang):
    for split in ("validation", "test"):
        assert len(load_task("xnli", lang, split, data_dir=data_dir)) == 210


def test_xnli_local_train_says_why(data_dir):
    with pytest.raises(ValueError, match="--train_split validation"):
        load_task("xnli", "en", "train", data_dir=data_dir)


def test_xnli_keeps_quotes(tmp_path):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "test-en.tsv").write_text('He said "hi\tShe said "bye" too\tneutral\n')
    ds = load_task("xnli", "en", "test", data_dir=tmp_path)
    assert ds[0] == {"premise": 'He said "hi', "hypothesis": 'She said "bye" too', "label": 1}


def test_tydiqa_sw_test(data_dir):
    ds = load_task("tydiqa", "sw", "test", data_dir=data_dir)
    assert len(ds) == 100
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert spans_match(ds)


@pytest.mark.parametrize("lang", task_languages("tydiqa"))
def test_tydiqa_every_language_test(data_dir, lang):
    ds = load_task("tydiqa", lang, "test", data_dir=data_dir)
    assert len(ds) == 100 and spans_match(ds)
    assert all(i.split("-")[0] == resolve(lang).name for i in ds["id"])


def test_tydiqa_keeps_all_answers(data_dir):
    ds = load_task("tydiqa", "en", "test", data_dir=data_dir)
    n_answers = collections.Counter(len(a["text"]) for a in ds["answers"])
    assert n_answers == {2: 56, 1: 44}


def test_tydiqa_validation_is_held_out_train(data_dir):
    train = load_task("tydiqa", "en", "train", data_dir=data_dir)
    val = load_task("tydiqa", "en", "validation", data_dir=data_dir)
    assert (len(train), len(val)) == (900, 100)
    assert not set(train["id"]) & set(val["id"])


def test_tydiqa_no_local_train_for_target_language(data_dir):
    with pytest.raises(FileNotFoundError, match="tydiqa.goldp.sw.train.json"):
        load_task("tydiqa", "sw", "train", data_dir=data_dir)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args,match",
    [
        (("squad", "en", "test"), "unknown task 'squad'; choose one of: xnli, nusax, tydiqa"),
        (("xnli", "klingon", "test"), "unknown language 'klingon'; known codes: .*ace"),
        (("xnli", "jav", "test"), "task 'xnli' has no language 'jav'; valid: en, ar, bg"),
        (("nusax", "jav", "dev"), "unknown split 'dev'; choose one of: train, validation, test"),
    ],
)
def test_bad_choices(data_dir, args, match):
    with pytest.raises(ValueError, match=match):
        load_task(*args, data_dir=data_dir)


def test_missing_file_names_path_and_layout(tmp_path):
    (tmp_path / "nusax").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nusax/javanese/test.csv[\s\S]*expected layout"):
        load_task("nusax", "jav", "test", data_dir=tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data dir not found"):
        load_task("nusax", "jav", "test", data_dir=tmp_path / "nope")


def test_empty_file(tmp_path):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "test-en.tsv").write_text("")
    with pytest.raises(DataFormatError, match="test-en.tsv: the file is empty"):
        load_task("xnli", "en", "test", data_dir=tmp_path)


def test_bad_label_names_file_and_line(tmp_path):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "test-en.tsv").write_text("a\tb\tentailment\nc\td\tmaybe\n")
    with pytest.raises(DataFormatError, match=r"test-en.tsv, line 2: label 'maybe'"):
        load_task("xnli", "en", "test", data_dir=tmp_path)


def test_wrong_field_count(tmp_path):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "dev-en.tsv").write_text("a\tentailment\n")
    with pytest.raises(DataFormatError, match="line 1: expected 3 tab-separated fields"):
        load_task("xnli", "en", "validation", data_dir=tmp_path)


def test_nusax_missing_column_and_bad_label(tmp_path):
    folder = tmp_path / "nusax" / "javanese"
    folder.mkdir(parents=True)
    (folder / "test.csv").write_text("id,sentence,label\n1,x,positive\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['text'\]"):
        load_task("nusax", "jav", "test", data_dir=tmp_path)
    (folder / "test.csv").write_text("id,text,label\n1,x,positive\n2,y,happy\n")
    with pytest.raises(DataFormatError, match="test.csv, line 3: label 'happy'"):
        load_task("nusax", "jav", "test", data_dir=tmp_path)
    (folder / "test.csv").write_text("id,text,label\n")
    with pytest.raises(DataFormatError, match="header but no rows"):
        load_task("nusax", "jav", "test", data_dir=tmp_path)


def _write_squad(tmp_path, answers, context="The cat sat on the mat. The cat left."):
    folder = tmp_path / "tydiqa" / "tydiqa-goldp-v1.1-dev"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "english-1-1", "question": "who?", "answers": answers}]}]}]}
    (folder / "tydiqa.goldp.en.dev.json").write_text(json.dumps(data))


def test_tydiqa_refinds_misplaced_answer_and_drops_missing(tmp_path, caplog):
    # "cat" given at a wrong offset 22 -> nearest occurrence is 28 (not 4); "dog" is nowhere -> dropped
    _write_squad(tmp_path, [{"text": "cat", "answer_start": 22}, {"text": "dog", "answer_start": 0}])
    ds = load_task("tydiqa", "en", "test", data_dir=tmp_path)
    assert ds[0]["answers"] == {"text": ["cat"], "answer_start": [28]}
    assert spans_match(ds)
    assert "1 answer offsets re-found" in caplog.text and "1 answers not found" in caplog.text


def test_tydiqa_unanswerable_everywhere_is_an_error(tmp_path):
    _write_squad(tmp_path, [{"text": "dog", "answer_start": 0}])
    with pytest.raises(DataFormatError, match="no usable questions"):
        load_task("tydiqa", "en", "test", data_dir=tmp_path)


def test_tydiqa_bad_json(tmp_path):
    folder = tmp_path / "tydiqa" / "tydiqa-goldp-v1.1-dev"
    folder.mkdir(parents=True)
    (folder / "tydiqa.goldp.en.dev.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_task("tydiqa", "en", "test", data_dir=tmp_path)


# ---------------------------------------------------------------- hub schemas (in memory, no network)
@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def install(datasets_by_key):
        def hub_load(path, name, split):
            calls.append((path, name, split))
            return datasets_by_key[(path, name, split)]

        monkeypatch.setattr(data_common, "hub_load", hub_load)
        for mod in ("xnli", "nusax", "tydiqa"):
            monkeypatch.setattr(f"flare.data.{mod}.hub_load", hub_load)
        return calls

    return install


def test_xnli_hub_schema(fake_hub):
    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
    })
    ds = datasets.Dataset.from_dict({"premise": ["p", "q"], "hypothesis": ["h", "i"], "label": [2, 0]},
                                    features=features)
    calls = fake_hub({("facebook/xnli", "es", "test"): ds})
    out = load_task("xnli", "spanish", "test")
    assert calls == [("facebook/xnli", "es", "test")]
    assert out.column_names == ["premise", "hypothesis", "label"] and out["label"] == [2, 0]


def test_nusax_hub_schema(fake_hub):
    features = datasets.Features({
        "id": datasets.Value("string"), "text": datasets.Value("string"), "lang": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "neutral", "positive"]),
    })
    ds = datasets.Dataset.from_dict({"id": ["7"], "text": ["apik"], "lang": ["javanese"], "label": [2]},
                                    features=features)
    calls = fake_hub({("indonlp/NusaX-senti", "jav", "train"): ds,
                      ("indonlp/NusaX-senti", "eng", "validation"): ds})
    assert load_task("nusax", "jav", "train")[0] == {"id": "7", "text": "apik", "label": 2}
    load_task("nusax", "en", "validation")
    assert calls[-1] == ("indonlp/NusaX-senti", "eng", "validation")


def test_tydiqa_hub_schema(fake_hub):
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
    })
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for i in range(20):
        lang = "swahili" if i % 2 else "english"
        rows["id"].append(f"{lang}--{i}-0")
        rows["title"].append("t")
        rows["context"].append("Mwaka 1999 alianza.")
        rows["question"].append("lini?")
        # the hub strips contexts without shifting offsets: start 7 instead of 6 must be re-found
        rows["answers"].append({"text": ["1999"], "answer_start": [7 if i == 3 else 6]})
    ds = datasets.Dataset.from_dict(rows, features=features)
    calls = fake_hub({(
        "google-research-datasets/tydiqa", "secondary_task", "validation"): ds,
        ("google-research-datasets/tydiqa", "secondary_task", "train"): ds})
    test = load_task("tydiqa", "sw", "test")
    assert calls[-1] == ("google-research-datasets/tydiqa", "secondary_task", "validation")
    assert len(test) == 10 and all(i.startswith("swahili-") for i in test["id"])
    assert spans_match(test)
    train, val = load_task("tydiqa", "sw", "train"), load_task("tydiqa", "sw", "validation")
    assert (len(train), len(val)) == (9, 1) and calls[-1][2] == "train"


# ---------------------------------------------------------------- language map
@pytest.mark.parametrize("name,code", [("bengali", "ben"), ("bn", "ben"), ("id", "ind"), ("Indonesian", "ind"),
                                       ("javanese", "jav"), ("eng", "en"), ("te", "tel"), ("toba_batak", "bbc")])
def test_language_aliases(name, code):
    assert resolve(name).code == code


def test_every_language_has_consistent_codes():
    for code, lang in LANGUAGES.items():
        assert resolve(code) is lang and resolve(lang.name) is lang
        if lang.nllb:
            assert "_" in lang.nllb


def test_nllb_fallback():
    assert nllb_code("jav") == ("jav_Latn", False)
    assert nllb_code("mad") == ("ind_Latn", True)
    with pytest.raises(ValueError, match="NLLB has no madurese"):
        nllb_code("mad", allow_fallback=False)


def test_paper_language_sets():
    assert task_languages("xnli") == "en ar bg de el es fr hi ru sw th tr ur vi zh".split()
    assert sorted(task_languages("nusax")) == sorted("en ind ace ban bbc bjn bug jav mad min nij sun".split())
    assert sorted(task_languages("tydiqa")) == sorted("en ar ru sw ben fi ko tel ind".split())
