"""The README and docs/: the front page short and in its order, every relative link resolving, every flag documented,
the README's study headline taken from the generated tables, the license files present."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_short_and_in_order():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections == ["Install and run the demo", "Reproducing the paper on a GPU node", "Results", "Status",
                        "Documentation", "Citation and license"]
    assert "docs/flare-fusion.svg" in text.split("## Install")[0]  # the figure, before anything else
    for page in ("usage", "fusion", "scaling", "performance", "study", "differences", "adding-a-model"):
        assert f"(docs/{page}.md)" in text.split("## Documentation")[1], page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def test_usage_page_documents_every_flag():
    """Each flag of the three scripts and the sweep appears in docs/usage.md (its flag tables)."""
    from flare import stage1, stage2, sweep

    module = sweep.load_script("run_translate.py")
    usage = (REPO / "docs" / "usage.md").read_text()
    for parser in (stage1.build_parser(), stage2.build_parser(), module.build_parser(), sweep.build_parser()):
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        assert [f for f in flags if f"`{f}`" not in usage] == [], parser.prog


def test_readme_study_headline_comes_from_the_generated_tables():
    """Every number of the README's headline rows is in docs/study.md's generated block of its condition (which
    tests/test_report.py checks against the committed results)."""
    readme = (REPO / "README.md").read_text()
    study = (REPO / "docs" / "study.md").read_text()
    rows = [line for line in readme.split("<!-- headline")[1].split("\n\n")[0].splitlines()
            if line.startswith("| oracle") or line.startswith("| lexical")]
    assert len(rows) == 2
    for row, root in zip(rows, ("results/embedded-nusax", "results/embedded-nusax-lexical")):
        block = study.split(f"<!-- flare.report {root}:")[1].split(f"<!-- /flare.report {root} -->")[0]
        cells = [c.strip().replace("−", "-") for c in row.strip("|").split("|")][2:]
        seeds = row.split("|")[2].strip()
        assert f"mean over seeds [{seeds}]" in block
        for cell in cells:  # a mean ("77.05") or a difference with its interval ("+10.85 [+8.55, +13.27]")
            mean, _, interval = cell.partition(" ")
            if not interval:
                assert f"| {mean} |" in block, (root, cell)
                continue
            # the comparison's row: its mean difference, then (after the per-seed means) its seeds-and-items interval
            assert any(f"| {mean} | " in line and line.split(" | ")[4] == interval for line in block.splitlines()
                       if line.startswith("| FLARE")), (root, cell)


def test_license_and_citation():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]["text"] == "MIT"
    citation = (REPO / "CITATION.cff").read_text()
    assert "Language Fusion for Parameter-Efficient Cross-lingual Transfer" in citation and "year: 2025" in citation
