"""The README's recipe table quotes only numbers that its linked docs page quotes.

Every row of the table in README.md that links a docs/recipes/*.md page is checked: each number
in its "what it shows, measured" cell (as written: ``0.933``, ``95.3``, ``48 418``, ``1.4e-12``) must
appear verbatim on the linked page, not as part of a longer number. The pages carry the full-run
results; the README summarises them and must not drift when a recipe is re-run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COLUMN = "what it shows, measured"
_LINK = re.compile(r"\]\((docs/recipes/[\w.-]+\.md)\)")
# thousands grouped by single spaces ("48 418"), or a plain number with optional decimals / exponent;
# digits glued to a letter are part of a name ("ℓ2", "L2"), not a number
_NUMBER = re.compile(r"(?<![^\W\d_])(?:\d{1,3}(?: \d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows() -> list[tuple[str, str]]:
    """(linked page, measured cell) for every README table row that links a docs/recipes page."""
    rows: list[tuple[str, str]] = []
    column = None
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.lstrip().startswith("|"):
            column = None  # a table ended
            continue
        row = cells(line)
        if COLUMN in row:
            column = row.index(COLUMN)
            continue
        link = _LINK.search(row[0])
        if column is not None and link and column < len(row):
            rows.append((link.group(1), row[column]))
    return rows


def numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def on_page(number: str, page: str) -> bool:
    """``number`` occurs in ``page``, not as a piece of a longer number (0.93 is not in 0.933)."""
    pattern = r"(?<![\d.])(?<!\d )" + re.escape(number) + r"(?!\.?\d)(?! \d{3}(?!\d))"
    return re.search(pattern, page) is not None


ROWS = table_rows()


def test_table_found() -> None:
    assert len(ROWS) >= 6, f"expected the recipe table in README.md, found {len(ROWS)} rows linking docs/recipes"


def test_number_helpers() -> None:
    assert numbers("no-HO 95.3 ± 0.3, 48 418 rates, ℓ2 1.4e-12 at 10 / 20") == [
        "95.3",
        "0.3",
        "48 418",
        "1.4e-12",
        "10",
        "20",
    ]
    assert on_page("0.933", "accuracy **0.933** here")
    assert not on_page("0.93", "accuracy 0.933")
    assert not on_page("95", "95.3 %")
    assert on_page("48 418", "with 48 418 rates.")
    assert not on_page("418", "with 48 418 rates")


@pytest.mark.parametrize(("page", "cell"), ROWS, ids=[page for page, _ in ROWS])
def test_readme_numbers_are_on_the_page(page: str, cell: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = [n for n in numbers(cell) if not on_page(n, text)]
    assert not missing, f"README row for {page} quotes {missing}, which {page} does not contain"


def test_readme_benchmark_summary_numbers_are_on_the_benchmarks_page() -> None:
    """The README's Benchmarks paragraph summarises docs/benchmarks.md and quotes nothing else."""
    readme = README.read_text(encoding="utf-8")
    start = readme.index("## Benchmarks")
    section = readme[start : readme.index("\n## ", start + 1)]
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    found = numbers(section)
    assert len(found) >= 10, f"expected the benchmark summary in README.md, found {found}"
    missing = [n for n in found if not on_page(n, page)]
    assert not missing, f"README's Benchmarks section quotes {missing}, which docs/benchmarks.md does not contain"
