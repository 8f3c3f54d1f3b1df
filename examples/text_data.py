"""Character-level text data for examples/train_gpt.py: real text every machine has, or yours.

By default the corpus is the Python standard library's own source: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (installed packages in ``site-packages`` left out). Any text
file or folder works instead (``--data PATH``): a folder contributes every UTF-8 text file under
it, hidden folders and ``__pycache__`` left out.

Files are read in one fixed order, sorted by their path relative to the root, and reading stops
at a cap on the number of characters (the last file read is cut to fit), so every rank of a job,
and every run on the same files, sees the same text. The split is by file: every tenth file
goes to validation. A single file is split by position instead (its last tenth).

The vocabulary is the sorted set of characters in the text; batches are drawn at offsets that
depend on ``(seed, step, rank, micro-step)`` only, so a resumed run reads exactly the batches
the interrupted one would have read, without any loader state to save.

Example::

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(12):
    ...     _ = (root / f"f{i:02d}.txt").write_text(f"file {i}\\n")
    >>> corpus = load_corpus(root)
    >>> [f.name for f in corpus.val_files]
    ['f09.txt']
    >>> corpus.decode(corpus.encode("file 3"))
    'file 3'
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Corpus", "TextFile", "default_root", "list_files", "load_corpus"]

#: Every VAL_EVERY-th file (the 10th, 20th, ... in reading order) is held out for validation.
VAL_EVERY = 10
#: Folders never read: installed packages, bytecode caches.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass
class TextFile:
    """One file of the corpus: its path relative to the root and the characters read from it."""

    name: str
    chars: int


@dataclass
class Corpus:
    """Encoded train and validation text, the vocabulary, and where the text came from."""

    root: Path
    vocab: list[str]
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    train_files: list[TextFile] = field(default_factory=list)
    val_files: list[TextFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not UTF-8 text

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``; raises ``ValueError`` for a character outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted({c for c in text if c not in index})
        if missing:
            raise ValueError(f"characters outside the vocabulary: {missing[:10]!r}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())

    def fingerprint(self) -> int:
        """A checksum of the vocabulary and both splits (ranks compare it to agree on the data)."""
        crc = zlib.crc32("".join(self.vocab).encode("utf-8", "surrogatepass"))
        for t in (self.train, self.val):
            crc = zlib.crc32(t.numpy().tobytes(), crc)
        return crc

    def batch(self, split: str, seed: int, step: int, rank: int, micro: int, batch_size: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows of ``block_size`` tokens and their next-token targets.

        A function of its arguments only: the window offsets come from a generator seeded with
        ``(seed, split, step, rank, micro)``.
        """
        data = self.train if split == "train" else self.val
        if len(data) <= block_size + 1:
            raise ValueError(
                f"the {split} split has {len(data)} tokens, too few for windows of "
                f"block_size={block_size}; raise --max-chars or lower --block-size"
            )
        key = [seed, 0 if split == "train" else 1, step, rank, micro]
        g = torch.Generator().manual_seed(zlib.crc32(np.array(key, dtype=np.int64).tobytes()))
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
        index = starts[:, None] + torch.arange(block_size + 1)
        window = data[index]
        return window[:, :-1], window[:, 1:]


def default_root() -> Path:
    """The Python standard library's source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files under ``root`` in reading order: sorted by relative path (POSIX separators).

    ``root`` may be a single file. Hidden folders and :data:`SKIPPED_DIRS` are left out;
    with ``suffixes``, only files whose name ends in one of them are listed.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"--data: no such file or folder: {str(root)!r}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in files:
            if not suffixes or name.endswith(suffixes):
                found.append(Path(folder, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    """The file's text, or ``None`` if it is not UTF-8 text (undecodable, or holds NUL bytes)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(data: str | os.PathLike[str] | None = None, max_chars: int = 3_000_000) -> Corpus:
    """Read, split and encode the corpus at ``data`` (default: the standard library's source).

    Raises:
        ValueError: ``data`` does not exist, holds no UTF-8 text, or ``max_chars`` is not
            positive.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    root = Path(data) if data is not None else default_root()
    paths = list_files(root, () if data is not None else (".py",))
    texts: list[tuple[str, str]] = []
    skipped: list[str] = []
    budget = max_chars
    for path in paths:
        if budget <= 0:
            break
        name = path.name if path == root else path.relative_to(root).as_posix()
        text = _read_text(path)
        if text is None:
            skipped.append(name)
            continue
        if not text:
            continue
        text = text[:budget]
        budget -= len(text)
        texts.append((name, text))
    if not texts:
        raise ValueError(f"--data: no UTF-8 text found under {str(root)!r}")

    if len(texts) == 1:  # one file: its last tenth is the validation text
        name, text = texts[0]
        cut = len(text) - max(1, len(text) // VAL_EVERY)
        train_parts, val_parts = [(name, text[:cut])], [(name, text[cut:])]
    else:
        val_parts = [t for i, t in enumerate(texts) if i % VAL_EVERY == VAL_EVERY - 1] or [texts[-1]]
        chosen = {id(t) for t in val_parts}
        train_parts = [t for t in texts if id(t) not in chosen]
    train_text = "".join(t for _, t in train_parts)
    val_text = "".join(t for _, t in val_parts)

    # Encode with numpy: code points, then their rank among the distinct code points.
    codes = np.frombuffer((train_text + val_text).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    distinct = np.unique(codes)
    ids = torch.from_numpy(np.searchsorted(distinct, codes).astype(np.int64))
    vocab = [chr(c) for c in distinct.tolist()]
    return Corpus(
        root=root,
        vocab=vocab,
        train=ids[: len(train_text)],
        val=ids[len(train_text):],
        train_files=[TextFile(n, len(t)) for n, t in train_parts],
        val_files=[TextFile(n, len(t)) for n, t in val_parts],
        skipped=skipped,
    )
