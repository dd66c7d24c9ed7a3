"""Training text: the running interpreter's own standard-library ``.py`` sources, read as bytes.

The file list is deterministic: every ``*.py`` under the stdlib directory (``sysconfig``'s ``stdlib`` path),
excluding ``site-packages``/``dist-packages`` and ``__pycache__``, sorted by relative POSIX path. Files are
split *by file*, by position in that list: of every :data:`PERIOD` consecutive files the second-to-last goes
to ``val``, the last to ``test``, the rest to ``train`` (90/5/5 by file count). Each split is the files'
bytes concatenated in list order; its sha256 is recorded so a result names the exact text it saw.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
PERIOD = 20
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """The data directory is missing, empty, or too small to split."""


def default_data_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(data_dir: Path) -> list[str]:
    """Sorted relative POSIX paths of the ``.py`` files under ``data_dir`` (see the module docstring)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist (expected a directory of .py sources)")
    files = []
    for path in data_dir.rglob("*.py"):
        rel = path.relative_to(data_dir)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    if not files:
        raise DataError(f"data directory {data_dir} has no .py files")
    return sorted(files)


def split_of(index: int, count: int) -> Split:
    """The split of the file at ``index`` in a sorted list of ``count`` files."""
    period = min(PERIOD, count)
    slot = index % period
    if slot == period - 1:
        return "test"
    if slot == period - 2:
        return "val"
    return "train"


@dataclass
class Corpus:
    """The three splits as bytes, with the files that went into each and each split's sha256."""

    data_dir: Path
    text: dict[Split, bytes]
    files: dict[Split, list[str]] = field(default_factory=dict)

    def sha256(self, split: Split) -> str:
        return hashlib.sha256(self.text[split]).hexdigest()

    def summary(self) -> dict[str, object]:
        """Plain-data description for metrics and manifests: per split its files, bytes and sha256."""
        return {
            "data_dir": str(self.data_dir),
            "file_order": "sorted relative paths; split by position (see cellserve.model.data)",
            "splits": {
                s: {"files": len(self.files[s]), "bytes": len(self.text[s]), "sha256": self.sha256(s)} for s in SPLITS
            },
        }


def load_corpus(data_dir: Path | str | None = None) -> Corpus:
    """Read and split the sources under ``data_dir`` (default: this interpreter's stdlib)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    files = list_sources(data_dir)
    if len(files) < 3:
        raise DataError(f"data directory {data_dir} has {len(files)} .py file(s); need at least 3 (train/val/test)")
    by_split: dict[Split, list[str]] = {s: [] for s in SPLITS}
    for index, rel in enumerate(files):
        by_split[split_of(index, len(files))].append(rel)
    text: dict[Split, bytes] = {}
    for split in SPLITS:
        text[split] = b"".join((data_dir / rel).read_bytes() for rel in by_split[split])
        if not text[split]:
            raise DataError(f"the {split} split of {data_dir} is empty (all its files are empty)")
    return Corpus(data_dir=data_dir, text=text, files=by_split)
