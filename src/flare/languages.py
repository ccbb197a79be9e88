"""One table of languages: the paper's codes, the names users know, and every dataset / NLLB code.

The canonical code of a language is the code the FLARE paper and the original scripts use (``en``, ``ar``, ``ben``,
``ind``, ``jav``, ...). :func:`resolve` also accepts ISO 639-1/639-3 codes and plain English names
(``bn``, ``bengali``, ``id``, ``indonesian``, ``javanese``, ``eng``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Language:
    code: str  # the paper's code, used in run names and file names
    name: str  # plain English name, lower case (also the NusaX folder / TyDiQA id prefix)
    nllb: str | None  # NLLB-200 code; None where NLLB has no such language
    iso1: str | None = None  # ISO 639-1, where one exists
    iso3: str | None = None  # ISO 639-3
    xnli: str | None = None  # facebook/xnli config and local file suffix
    nusax: str | None = None  # indonlp/NusaX-senti config (ISO 639-3); the local folder is `name`
    tydiqa: str | None = None  # local file code in tydiqa.goldp.<code>.dev.json (ISO 639-1, XTREME layout)
    aliases: tuple[str, ...] = field(default=())


# NLLB has no Toba Batak, Madurese or Ngaju. The original silently translated them as Indonesian; we keep that
# fallback only behind a loud warning (see flare.translate) and record it in meta.json.
NLLB_FALLBACK = "ind_Latn"

_LANGUAGES: tuple[Language, ...] = (
    # XNLI (and English, shared by all tasks)
    Language("en", "english", "eng_Latn", "en", "eng", xnli="en", nusax="eng", tydiqa="en"),
    Language("ar", "arabic", "arb_Arab", "ar", "ara", xnli="ar", tydiqa="ar"),
    Language("bg", "bulgarian", "bul_Cyrl", "bg", "bul", xnli="bg"),
    Language("de", "german", "deu_Latn", "de", "deu", xnli="de"),
    Language("el", "greek", "ell_Grek", "el", "ell", xnli="el"),
    Language("es", "spanish", "spa_Latn", "es", "spa", xnli="es"),
    Language("fr", "french", "fra_Latn", "fr", "fra", xnli="fr"),
    Language("hi", "hindi", "hin_Deva", "hi", "hin", xnli="hi"),
    Language("ru", "russian", "rus_Cyrl", "ru", "rus", xnli="ru", tydiqa="ru"),
    Language("sw", "swahili", "swh_Latn", "sw", "swa", xnli="sw", tydiqa="sw"),
    Language("th", "thai", "tha_Thai", "th", "tha", xnli="th"),
    Language("tr", "turkish", "tur_Latn", "tr", "tur", xnli="tr"),
    Language("ur", "urdu", "urd_Arab", "ur", "urd", xnli="ur"),
    Language("vi", "vietnamese", "vie_Latn", "vi", "vie", xnli="vi"),
    Language("zh", "chinese", "zho_Hans", "zh", "zho", xnli="zh"),
    # TyDiQA
    Language("ben", "bengali", "ben_Beng", "bn", "ben", tydiqa="bn", aliases=("bangla",)),
    Language("fi", "finnish", "fin_Latn", "fi", "fin", tydiqa="fi"),
    Language("ko", "korean", "kor_Hang", "ko", "kor", tydiqa="ko"),
    Language("tel", "telugu", "tel_Telu", "te", "tel", tydiqa="te"),
    Language("ind", "indonesian", "ind_Latn", "id", "ind", nusax="ind", tydiqa="id"),
    # NusaX
    Language("ace", "acehnese", "ace_Latn", None, "ace", nusax="ace"),
    Language("ban", "balinese", "ban_Latn", None, "ban", nusax="ban"),
    Language("bbc", "toba_batak", None, None, "bbc", nusax="bbc", aliases=("toba batak", "batak")),
    Language("bjn", "banjarese", "bjn_Latn", None, "bjn", nusax="bjn", aliases=("banjar",)),
    Language("bug", "buginese", "bug_Latn", None, "bug", nusax="bug"),
    Language("jav", "javanese", "jav_Latn", "jv", "jav", nusax="jav"),
    Language("mad", "madurese", None, None, "mad", nusax="mad"),
    Language("min", "minangkabau", "min_Latn", None, "min", nusax="min"),
    Language("nij", "ngaju", None, None, "nij", nusax="nij"),
    Language("sun", "sundanese", "sun_Latn", "su", "sun", nusax="sun"),
)

LANGUAGES: dict[str, Language] = {lang.code: lang for lang in _LANGUAGES}


def _alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for lang in _LANGUAGES:
        for key in (lang.code, lang.name, lang.iso1, lang.iso3, *lang.aliases):
            if key:
                table.setdefault(key.lower(), lang.code)
    return table


def resolve(lang: str) -> Language:
    """Return the :class:`Language` for a code or name (``'bn'``, ``'bengali'``, ``'ben'`` all work)."""
    code = _alias_table().get(str(lang).strip().lower())
    if code is None:
        known = ", ".join(sorted(LANGUAGES))
        raise ValueError(f"unknown language {lang!r}; known codes: {known} (plain names such as 'javanese' work too)")
    return LANGUAGES[code]


def task_languages(task: str) -> list[str]:
    """Canonical codes of the languages a task has data for."""
    attr = {"xnli": "xnli", "nusax": "nusax", "tydiqa": "tydiqa"}.get(task)
    if attr is None:
        raise ValueError(f"unknown task {task!r}; choose one of: xnli, nusax, tydiqa")
    return [lang.code for lang in _LANGUAGES if getattr(lang, attr)]


def nllb_code(lang: str, allow_fallback: bool = True) -> tuple[str, bool]:
    """NLLB code of ``lang`` and whether it is the Indonesian fallback (NLLB lacks bbc, mad, nij)."""
    language = resolve(lang)
    if language.nllb is not None:
        return language.nllb, False
    if not allow_fallback:
        raise ValueError(
            f"NLLB has no {language.name} ({language.code}); the original silently used Indonesian "
            f"({NLLB_FALLBACK}). Drop --no_fallback to accept that fallback, or use --model reference."
        )
    return NLLB_FALLBACK, True


def check_task(task: str) -> str:
    from flare.config import TASKS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return task


def check_task_language(task: str, lang: str) -> str:
    """Return the canonical code of ``lang`` if ``task`` has data for it, else raise listing the valid ones."""
    language = resolve(lang)
    valid = task_languages(check_task(task))
    if language.code not in valid:
        raise ValueError(f"task {task!r} has no language {lang!r}; valid: {', '.join(valid)}")
    return language.code
