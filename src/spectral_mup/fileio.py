"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never
half of one. JSON is always valid JSON: a non-finite float is written as ``null``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(fileobj)`` into a temporary sibling, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``obj`` as strict JSON text: NaN and ±inf (at any depth, tensors included) become
    ``null``, and ``allow_nan=False`` guarantees no ``NaN``/``Infinity`` token is written."""
    return json.dumps(
        finite_json(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, default=_json_default
    )


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (:func:`json_text`) to ``path`` atomically."""
    data = (json_text(obj) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def save_torch(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float in its dicts, lists and tuples (and
    one-element tensors) replaced by ``None``; other values are returned as they are."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return finite_json(obj.item())
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
