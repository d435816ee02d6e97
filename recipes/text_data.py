"""Offline text for the language-model recipes: corpora, a vocabulary, a PTB loader, batchify, and
the text domains of the data-mixing recipe (docstrings, prose and code of Python's standard library,
or one folder of text files per domain).

Nothing here downloads. The default corpus is the English text of Python's own documentation
topics, shipped in the standard library as ``pydoc_data.topics`` (about 74 000 word tokens once
tokenised as below). The Penn Treebank language-modelling files (``ptb.train.txt``,
``ptb.valid.txt``, ``ptb.test.txt``: one sentence per line, space-separated, already lower-cased
with rare words replaced by ``<unk>``) are read from a directory the user points ``--data-dir`` at.

Both are turned into the same thing: one long stream of token ids per split, where every line
ends with an ``<eos>`` token, and a :class:`Vocabulary` built on the training split only.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

EOS, UNK = "<eos>", "<unk>"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+")


class Vocabulary:
    """A token ↔ id map; ``<eos>`` and ``<unk>`` always exist, unknown tokens map to ``<unk>``.

    Args:
        tokens: the training tokens the vocabulary is built from.
        min_count: tokens seen fewer times become ``<unk>``.
    """

    def __init__(self, tokens: Iterable[str], min_count: int = 1) -> None:
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"`min_count={min_count!r}`: must be an integer >= 1.")
        counts = Counter(tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in (EOS, UNK)), key=lambda t: (-counts[t], t)
        )
        self.itos: list[str] = [EOS, UNK, *kept]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        """int64 ids of ``tokens`` (unknown ones as ``<unk>``)."""
        unk = self.stoi[UNK]
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


# ----------------------------------------------------------------------------- default corpus


def tokenize(text: str) -> list[str]:
    """Lower-case words (digit runs become ``N``, as in PTB); every non-empty line ends in ``<eos>``."""
    tokens: list[str] = []
    for line in text.splitlines():
        words = _WORD.findall(line.lower())
        if words:
            tokens.extend("N" if w.isdigit() else w for w in words)
            tokens.append(EOS)
    return tokens


def pydoc_tokens() -> list[str]:
    """The tokenised text of ``pydoc_data.topics`` (standard library), topics in sorted order."""
    from pydoc_data.topics import topics

    return tokenize("\n".join(topics[name] for name in sorted(topics)))


def split_tokens(tokens: Sequence[str], fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[list, list, list]:
    """Contiguous train / validation / test split of a token stream (the test split gets the rest)."""
    train, val = fractions
    if not (0 < train < 1 and 0 < val < 1 and train + val < 1):
        raise ValueError(f"`fractions={fractions!r}`: expected (train, val) in (0, 1) with train + val < 1.")
    a = int(train * len(tokens))
    b = a + int(val * len(tokens))
    return list(tokens[:a]), list(tokens[a:b]), list(tokens[b:])


# ------------------------------------------------------------------------------------- PTB


def read_ptb(path: str | Path) -> list[str]:
    """Tokens of one PTB-format file: whitespace-separated words, ``<eos>`` after every line."""
    path = Path(path)
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                tokens.extend(words)
                tokens.append(EOS)
    if not tokens:
        raise ValueError(f"{path} holds no tokens; expected PTB text (one space-separated sentence per line).")
    return tokens


def load_ptb(data_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(train, valid, test) token lists from ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``."""
    data_dir = Path(data_dir)
    names = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
    missing = [n for n in names if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not found in {data_dir}; point --data-dir at your PTB copy.")
    train, valid, test = (read_ptb(data_dir / n) for n in names)
    return train, valid, test


# ----------------------------------------------------------------------------------- choosing


def load_corpus(
    name: str = "pydoc", data_dir: str | Path | None = None, min_count: int = 2
) -> tuple[Tensor, Tensor, Tensor, Vocabulary]:
    """(train_ids, val_ids, test_ids, vocab) for ``name`` in {"pydoc", "ptb"}.

    ``pydoc`` is split 80/10/10 contiguously and words seen fewer than ``min_count`` times in the
    training split become ``<unk>``. ``ptb`` keeps every training word (the files are already
    closed-vocabulary).
    """
    if name == "pydoc":
        train, val, test = split_tokens(pydoc_tokens())
    elif name == "ptb":
        if data_dir is None:
            raise ValueError("`--corpus ptb` reads ptb.train.txt/ptb.valid.txt/ptb.test.txt: pass --data-dir.")
        train, val, test = load_ptb(data_dir)
        min_count = 1
    else:
        raise ValueError(f"unknown corpus {name!r}; expected 'pydoc' or 'ptb'.")
    vocab = Vocabulary(train, min_count=min_count)
    return vocab.encode(train), vocab.encode(val), vocab.encode(test), vocab


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D id stream into ``batch_size`` contiguous rows, shape (batch_size, len // batch_size).

    Row b continues the text of row b − 1; the remainder that does not fill a column is dropped.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size={batch_size!r}`: must be an integer >= 1.")
    if ids.ndim != 1:
        raise ValueError(f"`ids` must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}.")
    n = len(ids) // batch_size
    if n < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch_size={batch_size} (need >= 2 per row).")
    return ids[: n * batch_size].reshape(batch_size, n)


# ------------------------------------------------------------------------------ text domains

# Pure-Python standard-library modules whose docstrings and source make the default domains.
STDLIB_MODULES = tuple(
    """argparse ast base64 bisect calendar cmd code codecs collections colorsys configparser contextlib copy csv
    dataclasses datetime difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext
    glob gzip heapq hmac imaplib inspect ipaddress json locale logging lzma mailbox mimetypes numbers operator optparse
    os pathlib pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched
    secrets selectors shelve shlex shutil smtplib socket socketserver statistics string stringprep struct subprocess
    symtable tabnanny tarfile tempfile textwrap threading timeit token tokenize trace traceback types uuid warnings
    wave weakref webbrowser zipapp zipfile zipimport""".split()
)


def docstrings(module: str) -> str:
    """The docstrings of a standard-library module: its own, then those of its public classes, their
    public methods and its public functions, in name order (``inspect.cleandoc``-ed, blank-line separated)."""
    mod = importlib.import_module(module)
    parts = [mod.__doc__] if mod.__doc__ else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (deprecated aliases warn when touched)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(obj.__doc__ or "")
            if inspect.isclass(obj):
                parts += [
                    f.__doc__ or ""
                    for m, f in sorted(vars(obj).items())
                    if not m.startswith("_") and inspect.isfunction(f)
                ]
    return "\n\n".join(inspect.cleandoc(p) for p in parts if p and p.strip())


def source_code(module: str) -> str:
    """A standard-library module's source with every docstring removed (``ast.unparse``: code only,
    no comments). Needs the module's ``.py`` file, which CPython installs ship."""
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    except (OSError, TypeError) as err:
        raise FileNotFoundError(f"no Python source for the standard-library module {module!r} ({err}); "
                                f"pass --data-dir with your own text domains.") from None  # fmt: skip
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def shuffle_within_lines(text: str, generator: torch.Generator) -> str:
    """Every line's characters in a random order: the characters of ``text`` without its structure."""
    lines = []
    for line in text.split("\n"):
        order = torch.randperm(len(line), generator=generator).tolist()
        lines.append("".join(line[i] for i in order))
    return "\n".join(lines)


def read_domains(data_dir: str | Path) -> dict[str, str]:
    """One domain per sub-folder of ``data_dir``: the UTF-8 text of its ``*.txt`` files, in name order,
    newline-joined. Folders without text files are an error (an empty domain cannot be sampled)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: not a directory (expected one sub-folder per domain).")
    domains: dict[str, str] = {}
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.txt"))
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        if not text.strip():
            raise ValueError(f"{folder}: no text in *.txt files; every domain folder needs some.")
        domains[folder.name] = text
    if len(domains) < 2:
        raise ValueError(f"--data-dir {data_dir}: found {len(domains)} domain folder(s); a mixture needs at least 2.")
    return domains


def encode_bytes(text: str) -> Tensor:
    """``text`` as its UTF-8 bytes, a 1-D uint8 tensor (a byte-level vocabulary of 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
