"""Every recipe's bilevel core comes first in its script, is short, and is what its page shows.

The core is the section between ``# --8<-- [start:core]`` and ``# --8<-- [end:core]``: the model,
``train_loss``/``val_loss``, the hyperparameters and how they enter, the optimiser and the loop. The
page includes that section with pymdownx.snippets, so the code a reader sees is the code the
recipe's tests run (each recipe's test file also runs its core alone on tiny data). The lines a
reader must read to reuse the method are the core's plus those of every definition it reaches in
the recipe and its sibling modules (recipe_common, recipe_data, text_data), counted here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import markdown
import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SIBLINGS = ("recipe_common", "recipe_data", "text_data")  # shared modules a copied recipe brings along
NAMES = (
    "hypergradient_accuracy",
    "overfit_validation",
    "distillation",
    "augmentation",
    "dropout_lstm",
    "validation_split",
    "hypercleaning",
    "learning_rates",
    "data_mixing",
)
CORE_LINES = 80  # non-blank lines between the markers
READER_LINES = 120  # the core and everything it reaches in recipes/
START, END = "# --8<-- [start:core]", "# --8<-- [end:core]"


def core_span(source: str) -> tuple[int, int]:
    """1-based lines of the start and end markers; exactly one of each, in that order."""
    lines = source.splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.strip() == START]
    ends = [i + 1 for i, line in enumerate(lines) if line.strip() == END]
    assert len(starts) == 1 and len(ends) == 1, f"expected one {START!r} and one {END!r}, found {starts} and {ends}"
    assert starts[0] < ends[0], "the core's end marker comes before its start"
    return starts[0], ends[0]


def _definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Top-level functions, classes and assigned names of a module."""
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update({t.id: node for t in targets if isinstance(t, ast.Name)})
    return out


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def reader_lines(name: str) -> tuple[int, list[str]]:
    """Non-blank lines of the core plus every definition it reaches (transitively) in the recipe and
    its sibling modules, and the names of what it reaches outside the core."""
    modules: dict[str, tuple[list[str], dict[str, ast.stmt]]] = {}

    def module(mod: str) -> tuple[list[str], dict[str, ast.stmt]]:
        if mod not in modules:
            source = (RECIPES / f"{mod}.py").read_text(encoding="utf-8")
            modules[mod] = (source.splitlines(), _definitions(ast.parse(source)))
        return modules[mod]

    source = (RECIPES / f"{name}.py").read_text(encoding="utf-8")
    start, end = core_span(source)
    defs = module(name)[1]
    counted: set[tuple[str, int]] = {(name, i) for i in range(start + 1, end)}
    core_nodes = [n for n in ast.parse(source).body if start < n.lineno < end]
    todo: list[tuple[str, ast.AST]] = [(name, n) for n in core_nodes]
    reached: list[str] = []
    seen: set[tuple[str, str]] = {(name, d) for d, n in defs.items() if start < n.lineno < end}
    while todo:
        mod, node = todo.pop()
        for sub in ast.walk(node):
            target = None
            if isinstance(sub, ast.Name) and sub.id in module(mod)[1]:
                target = (mod, sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in SIBLINGS:
                if sub.attr in module(sub.value.id)[1]:
                    target = (sub.value.id, sub.attr)
            if target is None or target in seen:
                continue
            seen.add(target)
            definition = module(target[0])[1][target[1]]
            reached.append(f"{target[0]}.{target[1]}")
            counted.update((target[0], i) for i in range(_first_line(definition), definition.end_lineno + 1))
            todo.append((target[0], definition))
    count = sum(1 for mod, i in counted if module(mod)[0][i - 1].strip())
    return count, sorted(reached)


@pytest.mark.parametrize("name", NAMES)
def test_core_comes_first_and_is_short(name: str) -> None:
    source = (RECIPES / f"{name}.py").read_text(encoding="utf-8")
    start, end = core_span(source)
    tree = ast.parse(source)
    before = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.lineno < start]
    assert not before, f"{name}.py defines {before} before its core"
    inside = [n for n in tree.body if start < n.lineno < end]
    assert any(isinstance(n, ast.FunctionDef) for n in inside), "the core section holds no function"
    assert all(start < n.lineno and n.end_lineno < end for n in inside), "a definition crosses a core marker"
    body = [line for line in source.splitlines()[start : end - 1] if line.strip()]
    assert len(body) <= CORE_LINES, f"{name}.py's core is {len(body)} lines (at most {CORE_LINES})"
    count, reached = reader_lines(name)
    assert count <= READER_LINES, f"reusing {name}.py's method means reading {count} lines: core + {reached}"


@pytest.mark.parametrize("name", NAMES)
def test_page_opens_with_the_core_included_from_the_script(name: str) -> None:
    page = (ROOT / "docs" / "recipes" / f"{name}.md").read_text(encoding="utf-8")
    include = f'--8<-- "recipes/{name}.py:core"'
    first_python = re.search(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert first_python is not None and first_python[1].strip() == include, (
        f"docs/recipes/{name}.md must open its code with ```python {include}```"
    )
    # What mkdocs renders: pymdownx.snippets expands the include to exactly the marked section.
    md = markdown.Markdown(
        extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": {"base_path": [str(ROOT)]}}
    )
    expanded = md.preprocessors["snippet"].run([include])
    source = (RECIPES / f"{name}.py").read_text(encoding="utf-8").splitlines()
    start, end = core_span("\n".join(source))
    assert expanded == source[start : end - 1]


def test_reader_lines_follow_calls_into_the_recipe_and_its_siblings(tmp_path, monkeypatch) -> None:
    """The counter itself: a core that calls a local helper, which calls a sibling's, counts all three."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "recipe_common.py").write_text("def shared():\n    return 1\n\n\ndef unused():\n    return 2\n")
    (recipes / "toy.py").write_text(
        "import recipe_common\n\n"
        f"{START}\ndef core():\n    return helper()\n{END}\n\n\n"
        "def helper():\n    # a comment counts\n\n    return recipe_common.shared()\n\n\ndef other():\n    pass\n"
    )
    monkeypatch.setitem(globals(), "RECIPES", recipes)
    assert reader_lines("toy") == (2 + 3 + 2, ["recipe_common.shared", "toy.helper"])
