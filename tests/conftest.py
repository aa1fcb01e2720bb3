"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point SMUP_DATA_DIR at the shared data (holding tinyshakespeare/input.txt)."""
    env = os.environ.get("SMUP_DATA_DIR", "")
    path = (
        Path(env).expanduser()
        if env.strip()
        else Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    monkeypatch.setenv("SMUP_DATA_DIR", str(path))
    return path
