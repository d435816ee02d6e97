"""The documentation cannot rot: every ```python block in README.md and docs/**/*.md is executed.

Each page's blocks run in order in one namespace (later blocks use names defined earlier), in a
temporary working directory, with torch's default dtype reset to float32 as a user would have it.
A block immediately followed by a ```text block titled "Output" must print exactly that text, so
every number quoted in an output block is the number the code computes.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import bilevel

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def code_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, expected output or None) for every fenced block of ``text``.

    A block's expected output is the body of a ```text title="Output" block that follows it with
    only blank lines in between.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, int, str, str]] = []  # (opening line, closing line, info, body), 1-based
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed code fence opened on line {i + 1}")
        blocks.append((i + 1, j + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    out: list[tuple[int, str, str, str | None]] = []
    for k, (line, end, info, code) in enumerate(blocks):
        language = info.split()[0] if info else ""
        if language != "python":
            continue
        expected = None
        if k + 1 < len(blocks):
            next_line, _, next_info, next_code = blocks[k + 1]
            between = lines[end : next_line - 1]
            if next_info.startswith("text") and 'title="Output"' in next_info and not any(s.strip() for s in between):
                expected = next_code
        out.append((line, language, code, expected))
    return out


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


_INCLUDE = re.compile(r'--8<-- "[^"]+"\s*')  # a pymdownx.snippets include; tests/test_recipe_cores.py checks it
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def same_output(got: str, expected: str) -> bool:
    """Printed text equal, numbers equal up to float32 round-off across machines.

    The words must match exactly. The numbers must agree to 5 % or both be below 1e-4: the
    examples run in float32, and another CPU (other SIMD width, other BLAS blocking) sums in
    another order, which moves round-off-level results (a residual of 2e-11 or 1e-12, a CG that
    meets its tolerance one iteration earlier) without changing what the page shows.
    """
    got, expected = _normalise(got), _normalise(expected)
    if got == expected:
        return True
    if _NUMBER.split(got) != _NUMBER.split(expected):
        return False
    pairs = zip(map(float, _NUMBER.findall(got)), map(float, _NUMBER.findall(expected)))
    return all(abs(a - b) <= 0.05 * max(abs(a), abs(b)) or max(abs(a), abs(b)) < 1e-4 for a, b in pairs)


def test_every_page_has_been_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/theory.md", "docs/choosing.md"} <= names


def test_fence_parser_pairs_code_with_its_output():
    page = 'x\n\n```python\nprint(1)\n```\n\n```text title="Output"\n1\n```\n\n```python\ny = 2\n```\n'
    assert code_blocks(page) == [(3, "python", "print(1)\n", "1\n"), (11, "python", "y = 2\n", None)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_default_dtype(torch.float32)  # what a reader's fresh interpreter has
    namespace: dict = {"__name__": "__docs__"}
    for line, _, code, expected in code_blocks(page.read_text(encoding="utf-8")):
        if _INCLUDE.fullmatch(code):
            continue  # a recipe's core, included from the script that its own tests run
        where = f"{page.relative_to(ROOT)}:{line}"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, where, "exec"), namespace)
        if expected is not None:
            got = stdout.getvalue()
            assert same_output(got, expected), f"printed output differs at {where}:\n{got}\nexpected:\n{expected}"


def test_output_comparison_tolerates_round_off_only():
    assert same_output("CG < 1e-10 (28)  err 2.4e-11", "CG < 1e-10 (27)  err 1.3e-12")
    assert same_output("cosine 0.9965", "cosine 0.9966")
    assert not same_output("cosine 0.80", "cosine 0.99")  # a real change of result
    assert not same_output("converged=True", "converged=False")
    assert not same_output("steps = 2", "steps = 1")
    assert not same_output("3 items", "3 items\nmore")


def test_every_public_name_is_in_the_api_reference():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: bilevel\.(\w+)\s*$", page.read_text(encoding="utf-8"), re.M))
    missing = sorted(set(bilevel.__all__) - documented)
    assert not missing, f"public names without an API entry (add `::: bilevel.NAME` to docs/api/*.md): {missing}"
