"""Offline text for the language-model recipe: a corpus, a vocabulary, a PTB loader and batchify.

Nothing here downloads. The default corpus is the English text of Python's own documentation
topics, shipped in the standard library as ``pydoc_data.topics`` (about 74 000 word tokens once
tokenised as below). The Penn Treebank language-modelling files (``ptb.train.txt``,
``ptb.valid.txt``, ``ptb.test.txt``: one sentence per line, space-separated, already lower-cased
with rare words replaced by ``<unk>``) are read from a directory the user points ``--data-dir`` at.

Both are turned into the same thing: one long stream of token ids per split, where every line
ends with an ``<eos>`` token, and a :class:`Vocabulary` built on the training split only.
"""

from __future__ import annotations

import re
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
