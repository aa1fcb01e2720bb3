"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def shared_data_dir() -> Path:
    """$SMUP_DATA_DIR, or ../shared/data beside the checkout."""
    env = os.environ.get("SMUP_DATA_DIR", "")
    if env.strip():
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point SMUP_DATA_DIR at the shared data (holding tinyshakespeare/input.txt)."""
    path = shared_data_dir()
    monkeypatch.setenv("SMUP_DATA_DIR", str(path))
    return path


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models run fastest on one thread, and a busy 2-core machine does not thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses
    yield
    torch.set_num_threads(threads)
