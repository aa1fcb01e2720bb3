"""A run's files and checkpoints: the artifact names, loading a run's checkpoint (checked
against the config that resumes it), and the stacked loop's own checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, fingerprint
from ..errors import CheckpointError
from ..fileio import save_torch

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
WEIGHTS = "model.pt"
SHARDED = "checkpoint-{:08d}.dcp"  # FSDP2: model and optimizer, beside checkpoint.pt
FORMAT = "spectral-mup-checkpoint-v1"
STACK_FORMAT = "smup-stack-2"  # 2: one RunState per run (1: parallel lists)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a corrupt file is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({reason[:120]}); delete it to start over"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a spectral-mup checkpoint; delete it or use another out_dir"
        )
    return ckpt


def check_fingerprint(ckpt: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """Raise unless the checkpoint was written by this config (runtime keys aside; the
    stored fingerprint is re-fingerprinted, so a checkpoint written while a key was not yet
    runtime-only still resumes)."""
    theirs, ours = fingerprint(ckpt["config"]), fingerprint(cfg)
    if theirs == ours:
        return
    diff = sorted(
        f"{s}.{k}"
        for s in theirs.keys() | ours.keys()
        for k in theirs.get(s, {}).keys() | ours.get(s, {}).keys()
        if theirs.get(s, {}).get(k) != ours.get(s, {}).get(k)
    )
    raise CheckpointError(
        f"{path} was written by a different config (differs in {', '.join(diff) or 'keys'}); "
        "use another train.out_dir or --train.resume false"
    )


def save_stack(path: Path, state: dict[str, Any]) -> None:
    """Write a stacked loop's checkpoint (``state`` without its format tag)."""
    save_torch(path, {"format": STACK_FORMAT, **state})


def load_stack(path: Path) -> dict[str, Any]:
    """A stack checkpoint; an unreadable or foreign file is ignored (the stack starts over)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for bad files
        return {}
    return state if isinstance(state, dict) and state.get("format") == STACK_FORMAT else {}
