"""Checkpoints of the demo: safe to load, atomic to write, refused when incomplete.

A checkpoint is three files in the run folder:

- ``model-<step>.safetensors``: the model's weights (safetensors: no code runs on load);
- ``state-<step>.pt``: settings, optimizer, scheduler, RNG state and loss history, made only of
  tensors and plain Python values, so that it loads with ``torch.load(..., weights_only=True)``;
- ``checkpoint.json``: the manifest, written last; it names the two files with their sizes and
  SHA-256 hashes.

Every file is written to a temporary name, flushed to disk and renamed over its target
(``os.replace``, atomic on POSIX and Windows); the data files carry the step in their name and
the previous checkpoint's files are removed only after the new manifest is in place. A process
killed at any point therefore leaves either the previous checkpoint or the new one, both whole.
Loading checks each file against the manifest and raises :class:`CheckpointError` on any
difference (a file cut short, changed or missing) instead of loading partial weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "checkpoint.json"
FORMAT = "lm_demo-checkpoint"
VERSION = 1
# The files a checkpoint writes (data files and temporary names): others are never removed.
_OWN_FILE = re.compile(
    r"^(?:model-\d+\.safetensors|state-\d+\.pt"
    r"|\.(?:model-\d+\.safetensors|state-\d+\.pt|checkpoint\.json)\.tmp-\d+)$"
)


class CheckpointError(ValueError):
    """The checkpoint is missing, incomplete, corrupt or of another format."""


@dataclass
class Checkpoint:
    """A verified checkpoint: ``model`` (name -> CPU tensor) and ``state`` (the dict saved as
    ``state``: ``settings``, ``optimizer``, ``scheduler``, ``rng``, ``history``, ...)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return self.state["settings"]


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest of ``path``: ``path`` itself, or ``path/checkpoint.json`` for a run folder."""
    path = Path(path).expanduser()
    return path / MANIFEST if path.is_dir() else path


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``, never a part: temporary file in the same folder, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _entry(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write the checkpoint of ``step`` to ``folder`` and return its manifest's path.

    Args:
        model_state: the model's ``state_dict()`` (tensors; copied to CPU here).
        state: everything else, made only of tensors and plain Python values (dict, list,
            tuple, str, int, float, bool, None), so that it loads with ``weights_only=True``.
    """
    from safetensors.torch import save as safetensors_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Copies: safetensors refuses tensors that share memory (tied or shared weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    model_bytes = safetensors_save(tensors, metadata={"step": str(step)})
    buffer = io.BytesIO()
    torch.save({**state, "step": step}, buffer)
    state_bytes = buffer.getvalue()

    model_name, state_name = f"model-{step:08d}.safetensors", f"state-{step:08d}.pt"
    atomic_write(folder / model_name, model_bytes)
    atomic_write(folder / state_name, state_bytes)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "files": {
            "model": _entry(model_name, model_bytes),
            "state": _entry(state_name, state_bytes),
        },
    }
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    # Only now is the previous checkpoint no longer needed.
    for old in folder.iterdir():
        if _OWN_FILE.match(old.name) and old.name not in (model_name, state_name):
            old.unlink(missing_ok=True)
    return folder / MANIFEST


def _read_verified(folder: Path, entry: Any, what: str) -> bytes:
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    ):
        raise CheckpointError(f"the manifest's entry for the {what} file is malformed: {entry!r}")
    name = entry["name"]
    if Path(name).name != name:
        raise CheckpointError(f"the manifest names a file outside its folder: {name!r}")
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"the {what} file {path} is missing") from None
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"the {what} file {path} has {len(data)} bytes, the manifest says {entry['bytes']}: "
            "it was cut short or changed; this checkpoint is not valid"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"the {what} file {path} does not match the SHA-256 hash in the manifest: it is "
            "corrupt or was changed; this checkpoint is not valid"
        )
    return data


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and verify a checkpoint (its ``checkpoint.json`` or its folder); tensors on CPU.

    Raises:
        CheckpointError: the manifest is missing or unreadable, a file is missing, its size or
            hash differs from the manifest, or a file does not parse.
    """
    from safetensors.torch import load as safetensors_load

    manifest_file = manifest_path(path)
    try:
        text = manifest_file.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint manifest at {manifest_file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the checkpoint manifest {manifest_file}: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{manifest_file} is not a checkpoint manifest of this demo (JSON: {e}); "
            "checkpoints are resumed from their checkpoint.json or run folder"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_file} is not a checkpoint manifest of this demo")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest_file} has checkpoint format version {manifest.get('version')!r}; "
            f"this demo reads version {VERSION}"
        )
    files = manifest.get("files")
    step = manifest.get("step")
    if not isinstance(files, dict) or not isinstance(step, int):
        raise CheckpointError(f"{manifest_file} is malformed (no files or step)")
    folder = manifest_file.parent
    model_bytes = _read_verified(folder, files.get("model"), "model")
    state_bytes = _read_verified(folder, files.get("state"), "state")
    try:
        model = safetensors_load(model_bytes)
    except Exception as e:
        raise CheckpointError(f"the model file does not parse as safetensors: {e}") from e
    try:
        state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"the state file does not load with weights_only=True: {e}") from e
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(
            f"the state file belongs to another step than the manifest's ({step})"
        )
    return Checkpoint(path=manifest_file, step=step, model=model, state=state)
