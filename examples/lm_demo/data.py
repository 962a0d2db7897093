"""Byte-level text data: the default corpus is the Python standard library's own source.

Every machine that runs the demo has a Python installation, so the default data needs no
download: the ``.py`` files of the running interpreter's standard library, read as bytes. Files
are split between training and validation by a hash of their path, so the split is the same on
every run and machine with the same Python.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = {
    ".py",
    ".txt",
    ".md",
    ".rst",
    ".json",
    ".toml",
    ".cfg",
    ".ini",
    ".html",
    ".c",
    ".h",
}


@dataclass
class ByteCorpus:
    """Training and validation bytes as 1-D ``uint8`` tensors."""

    train: torch.Tensor
    val: torch.Tensor
    source: str

    @property
    def vocab_size(self) -> int:
        return 256


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--data: no such file or folder: {root}")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES and "test" not in p.parts
    )
    if not files:
        raise FileNotFoundError(
            f"--data: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {root}"
        )
    return files


def load_corpus(
    path: str | None = None, max_bytes: int = 16_000_000, val_fraction: float = 0.05
) -> ByteCorpus:
    """Read a file or folder (default: the standard library) into train/validation bytes.

    Args:
        path: a text file or a folder searched recursively for text files; ``None`` for the
            standard library of the running interpreter.
        max_bytes: stop reading once this many bytes were collected (files in sorted order).
        val_fraction: share of files (by path hash) that go to validation; a single file is
            split by position instead.
    """
    root = stdlib_root() if path is None else Path(path).expanduser()
    files = _text_files(root)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    total = 0
    for file in files:
        data = file.read_bytes()
        if not data:
            continue
        if len(files) == 1:
            cut = int(len(data) * (1 - val_fraction))
            train_parts.append(data[:cut])
            val_parts.append(data[cut:])
        elif zlib.crc32(str(file.relative_to(root)).encode()) % 1000 < val_fraction * 1000:
            val_parts.append(data)
        else:
            train_parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    train = b"".join(train_parts)
    val = b"".join(val_parts)
    if len(train) < 1024 or len(val) < 256:
        raise ValueError(
            f"--data: {root} holds too little text ({len(train)} training and {len(val)} "
            "validation bytes); give at least a few kilobytes"
        )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return ByteCorpus(train=as_tensor(train), val=as_tensor(val), source=str(root))


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``[B, T]`` and next-byte targets ``[B, T]`` (int64, CPU)."""
    if data.numel() <= seq_len + 1:
        raise ValueError(
            f"the data ({data.numel()} bytes) is shorter than one sequence ({seq_len + 1})"
        )
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")
