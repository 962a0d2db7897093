"""Saving and loading statistics as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(1e308, value)
    return value


def save_results(
    results: Mapping[str, Any], model_name: str, directory: str | Path | None = None
) -> Path:
    """Write ``results`` (statistics from the hooks or ``compute_weight_statistics``) to
    ``<directory>/<model_name>.json`` (default directory: ``./results``, as upstream). NaN is
    written as ``null``. Returns the path."""
    folder = Path.cwd() / "results" if directory is None else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_name}.json"
    path.write_text(json.dumps(_plain(results), indent=2))
    return path


def load_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a file written by :func:`save_results` (``null`` comes back as NaN)."""

    def restore(value):
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        return math.nan if value is None else value

    return restore(json.loads(Path(path).read_text()))
