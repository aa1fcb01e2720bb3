"""The example scripts run and train."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_hf_pretrain_example_trains_a_gpt2() -> None:
    """40 AdamW steps of a μP GPT-2 (width 64, base 32) in the plain loop: measured val loss
    3.24 (from ln 65 = 4.17 at init); the bound leaves 0.4."""
    args = ["--arch", "gpt2", "--width", "64", "--depth", "2", "--base-width", "32"]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_pretrain.py"), *args, "--steps", "40"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    val = float(re.search(r"val loss ([\d.]+)", done.stdout).group(1))
    assert val < 3.65, done.stdout
