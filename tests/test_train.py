"""Tests for spectral_mup.train: exact resume, checkpoints, divergence, early stop, schedules."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spectral_mup import sweep
from spectral_mup import train as T
from spectral_mup.config import RunConfig, build_config, load_config
from spectral_mup.errors import CheckpointError
from spectral_mup.fileio import write_json
from spectral_mup.train import loop as TL
from spectral_mup.train import lr_factor, run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--model.width",
    "32",
    "--model.depth",
    "1",
    "--model.n_heads",
    "2",
    "--model.block_size",
    "32",
    "--param.base_width",
    "32",
    "--param.base_depth",
    "1",
    "--train.batch_size",
    "4",
    "--train.eval_iters",
    "2",
    "--train.warmup_iters",
    "5",
    "--train.progress",
    "false",
]


def tiny(out_dir: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, "--train.out_dir", str(out_dir), *overrides])


# ----------------------------------------------------------------------------- exact resume

RESUME_TOML = """\
[model]
width = 32
depth = 2
n_heads = 2
block_size = 32
dropout = 0.1

[param]
kind = "mup"
base_width = 32
base_depth = 2

[optim]
name = "adamw"
lr = 1e-2

[train]
batch_size = 4
max_iters = 200
warmup_iters = 5
eval_interval = 10
eval_iters = 2
checkpoint_interval = 10
seed = 3
progress = false
"""


def test_exact_resume_after_sigkill(tmp_path: Path) -> None:
    cfg_path = tmp_path / "resume.toml"
    cfg_path.write_text(RESUME_TOML, encoding="utf-8")
    dir_a, dir_b = tmp_path / "A", tmp_path / "B"
    cfg_a = load_config(cfg_path, ["--train.out_dir", str(dir_a)])
    cfg_b = load_config(cfg_path, ["--train.out_dir", str(dir_b)])
    assert T.fingerprint(cfg_a) == T.fingerprint(cfg_b)
    max_iters = cfg_a.train.max_iters

    # Run B in a real process and SIGKILL it once it has written a checkpoint.
    with (tmp_path / "b.stderr").open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "spectral_mup.cli", "train", str(cfg_path)),
                *("--train.out_dir", str(dir_b)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=os.environ.copy(),
        )
        ckpt = dir_b / T.CHECKPOINT
        deadline = time.monotonic() + 120
        try:
            while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            finished_early = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    stderr = (tmp_path / "b.stderr").read_text(errors="replace")
    assert not finished_early, f"run B ended before it was killed: {stderr}"
    assert proc.returncode == -signal.SIGKILL
    killed = torch.load(ckpt, weights_only=True)
    killed_iter = killed["state"]["iter"]
    assert killed_iter % 10 == 0
    assert 10 <= killed_iter < max_iters
    assert len(killed["history"]["train_loss"]) == killed_iter
    assert not (dir_b / T.WEIGHTS).exists()
    assert not (dir_b / T.RESULT).exists()

    result_a = run(cfg_a, log=None)
    messages: list[str] = []
    result_b = run(cfg_b, log=messages.append)
    assert messages[0] == f"resumed from {ckpt} at iteration {killed_iter}"

    for r in (result_a, result_b):
        assert r["status"] == "ok"
        assert r["stop_reason"] == "max_iters"
        assert r["iters"] == max_iters
        assert len(r["history"]["train_loss"]) == max_iters
        assert [v[0] for v in r["history"]["val"]] == list(range(10, max_iters + 1, 10))
    # Bit-for-bit: no tolerance.
    assert result_b["history"]["train_loss"] == result_a["history"]["train_loss"]
    assert result_b["history"]["val"] == result_a["history"]["val"]
    assert result_b["history"]["lr"] == result_a["history"]["lr"]
    assert result_b["best_val_loss"] == result_a["best_val_loss"]
    assert result_b["best_iter"] == result_a["best_iter"]
    # The history written to disk agrees as well.
    on_disk = json.loads((dir_b / T.RESULT).read_text())
    assert on_disk["history"]["train_loss"] == result_a["history"]["train_loss"]

    weights_a = torch.load(dir_a / T.WEIGHTS, weights_only=True)
    weights_b = torch.load(dir_b / T.WEIGHTS, weights_only=True)
    assert weights_a.keys() == weights_b.keys()
    assert len(weights_a) > 0
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_and_weights_load_with_weights_only(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--train.max_iters", "4", "--train.eval_interval", "2")
    result = run(cfg, log=None)
    assert result["status"] == "ok"
    ckpt = torch.load(tmp_path / "run" / T.CHECKPOINT, weights_only=True)
    assert set(ckpt) == {
        "format",
        "config",
        "model",
        "optimizer",
        "scheduler",
        "data_rng",
        "torch_rng",
        "history",
        "state",
    }
    assert ckpt["format"] == "spectral-mup-checkpoint-v1"
    assert ckpt["config"] == T.fingerprint(cfg)
    assert "out_dir" not in ckpt["config"]["train"]
    assert ckpt["state"]["iter"] == 4
    assert ckpt["state"]["stop_reason"] == "max_iters"
    assert ckpt["history"]["train_loss"] == result["history"]["train_loss"]
    weights = torch.load(tmp_path / "run" / T.WEIGHTS, weights_only=True)
    assert weights.keys() == ckpt["model"].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    assert T.load_checkpoint(tmp_path / "run" / T.CHECKPOINT)["state"]["iter"] == 4


# ----------------------------------------------------------------------------- divergence


def test_huge_lr_diverges_without_exception(tmp_path: Path) -> None:
    cfg = tiny(
        tmp_path / "run",
        "--optim.name",
        "sgd",
        "--optim.lr",
        "1e3",
        "--train.warmup_iters",
        "0",
        "--train.max_iters",
        "50",
        "--train.eval_interval",
        "10",
    )
    result = run(cfg, log=None)
    assert result["status"] == "diverged"
    assert result["stop_reason"] == "diverged"
    assert isinstance(result["diverged_at"], int)
    assert 0 <= result["diverged_at"] < 50
    assert result["iters"] <= result["diverged_at"] + 1
    assert not (tmp_path / "run" / T.WEIGHTS).exists()
    on_disk = json.loads((tmp_path / "run" / T.RESULT).read_text())
    assert on_disk["status"] == "diverged"
    assert on_disk["diverged_at"] == result["diverged_at"]


def test_loss_ceiling_diverges_at_iteration_zero(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--train.loss_ceiling", "0.5", "--train.max_iters", "10")
    messages: list[str] = []
    result = run(cfg, log=messages.append)
    assert result["status"] == "diverged"
    assert result["stop_reason"] == "diverged"
    assert result["diverged_at"] == 0
    assert result["iters"] == 0
    assert result["history"]["train_loss"] == []
    assert result["best_val_loss"] is None
    assert result["final_val_loss"] is None
    assert len(messages) == 1
    assert messages[0].startswith("diverged at iteration 0: loss ")
    assert messages[0].endswith("(ceiling 0.5)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [T.RESULT]


def _strict_json(text: str):
    """Parse JSON as the standard defines it: NaN and Infinity are not JSON."""

    def reject(token: str):
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def test_nan_val_loss_diverges_and_result_json_stays_valid(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TL, "evaluate", lambda *args, **kwargs: math.nan)
    cfg = tiny(tmp_path / "run", "--train.max_iters", "10", "--train.eval_interval", "2")
    result = run(cfg, log=None)
    assert (result["status"], result["diverged_at"], result["iters"]) == ("diverged", 2, 2)
    assert result["best_val_loss"] is None and result["final_val_loss"] is None
    on_disk = _strict_json((tmp_path / "run" / T.RESULT).read_text())
    assert on_disk["history"]["val"] == [[2, None]]
    assert on_disk["final_val_loss"] is None and on_disk["status"] == "diverged"


def test_write_json_writes_non_finite_floats_as_null(tmp_path: Path) -> None:
    obj = {
        "a": math.nan,
        "b": [1.5, -math.inf, (math.inf, {"c": math.nan})],
        "d": torch.tensor(float("nan")),
        "e": torch.tensor(2.0),
        "f": Path("x"),
        "g": True,
    }
    path = write_json(tmp_path / "out.json", obj)
    assert _strict_json(path.read_text()) == {
        "a": None,
        "b": [1.5, None, [None, {"c": None}]],
        "d": None,
        "e": 2.0,
        "f": "x",
        "g": True,
    }
    assert obj["a"] != obj["a"] and obj["b"][1] == -math.inf  # the input is not changed


# ----------------------------------------------------------------------------- early stop


def test_early_stop_when_val_stalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TL, "evaluate", lambda *args, **kwargs: 3.0)
    cfg = tiny(
        tmp_path / "run",
        "--train.eval_interval",
        "1",
        "--train.patience",
        "3",
        "--train.max_iters",
        "50",
    )
    result = run(cfg, log=None)
    assert result["status"] == "ok"
    assert result["stop_reason"] == "early_stop"
    assert result["iters"] == 4
    assert result["best_iter"] == 1
    assert result["best_val_loss"] == 3.0
    assert result["history"]["val"] == [[1, 3.0], [2, 3.0], [3, 3.0], [4, 3.0]]
    assert len(result["history"]["train_loss"]) == 4
    assert result["diverged_at"] is None

    # A rerun finds the finished run and does not train on.
    again = run(cfg, log=None)
    assert again["stop_reason"] == "early_stop"
    assert again["iters"] == 4
    assert again["history"] == result["history"]


# ----------------------------------------------------------------------------- learning


def test_training_lowers_val_loss(tmp_path: Path) -> None:
    cfg = tiny(
        tmp_path / "run",
        "--optim.lr",
        "1e-2",
        "--train.max_iters",
        "60",
        "--train.eval_interval",
        "20",
    )
    result = run(cfg, log=None)
    assert result["status"] == "ok"
    assert result["iters"] == 60
    vals = [v for _, v in result["history"]["val"]]
    assert [it for it, _ in result["history"]["val"]] == [20, 40, 60]
    assert result["best_val_loss"] < 3.3 < math.log(65)
    assert vals[-1] < vals[0]
    assert result["history"]["train_loss"][0] > 3.9  # ≈ ln 65 = 4.17 at init
    assert result["final_train_loss"] < result["history"]["train_loss"][0] - 0.5


# ----------------------------------------------------------------------------- lr schedule


def _schedule(schedule: str, warmup: int = 10, max_iters: int = 100, ratio: float = 0.1):
    cfg = load_config(
        None,
        [
            "--train.schedule",
            schedule,
            "--train.warmup_iters",
            str(warmup),
            "--train.max_iters",
            str(max_iters),
            "--train.min_lr_ratio",
            str(ratio),
        ],
    )
    return lr_factor(cfg)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_warmup_is_linear(schedule: str) -> None:
    f = _schedule(schedule)
    assert [f(it) for it in range(10)] == [(it + 1) / 11 for it in range(10)]
    assert f(10) == 1.0


def test_lr_cosine_schedule() -> None:
    f = _schedule("cosine")
    assert f(10) == 1.0
    assert f(55) == pytest.approx(0.55, abs=1e-12)
    assert f(100) == pytest.approx(0.1, abs=1e-12)
    assert f(150) == pytest.approx(0.1, abs=1e-12)
    values = [f(it) for it in range(10, 101)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_lr_linear_schedule() -> None:
    f = _schedule("linear")
    assert f(10) == 1.0
    assert f(55) == pytest.approx(0.55, abs=1e-12)
    assert f(32.5) == pytest.approx(0.775, abs=1e-12)
    assert f(100) == pytest.approx(0.1, abs=1e-12)
    assert f(77) - f(78) == pytest.approx(0.01, abs=1e-12)


def test_lr_constant_schedule() -> None:
    f = _schedule("constant")
    assert {f(it) for it in range(10, 500)} == {1.0}
    g = _schedule("cosine", warmup=0, ratio=0.0)
    assert g(0) == 1.0
    assert g(100) == pytest.approx(0.0, abs=1e-12)


def test_run_follows_the_schedule(tmp_path: Path) -> None:
    cfg = tiny(
        tmp_path / "run",
        "--train.max_iters",
        "12",
        "--train.eval_interval",
        "12",
        "--train.warmup_iters",
        "3",
        "--train.schedule",
        "linear",
    )
    result = run(cfg, log=None)
    f = lr_factor(cfg)
    lrs = result["history"]["lr"]
    assert len(lrs) == 12
    base = lrs[3] / f(3)
    assert lrs == pytest.approx([base * f(it) for it in range(12)], rel=1e-12)


# ----------------------------------------------------------------------------- rerun


def test_rerun_of_finished_run_does_not_train(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--train.max_iters", "20", "--train.eval_interval", "10")
    first = run(cfg, log=None)
    weights = torch.load(tmp_path / "run" / T.WEIGHTS, weights_only=True)
    messages: list[str] = []
    second = run(cfg, log=messages.append)
    assert messages == [f"resumed from {tmp_path / 'run' / T.CHECKPOINT} at iteration 20"]
    assert second["iters"] == first["iters"] == 20
    assert second["status"] == "ok"
    assert second["stop_reason"] == "max_iters"
    assert second["history"] == first["history"]
    assert second["best_val_loss"] == first["best_val_loss"]
    assert second["final_train_loss"] == first["final_train_loss"]
    again = torch.load(tmp_path / "run" / T.WEIGHTS, weights_only=True)
    for name, tensor in weights.items():
        assert torch.equal(tensor, again[name]), name


def test_resume_on_another_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.device is outside a sweep run's id, so a killed run may resume elsewhere."""
    assert {("train", key) for key in T.RUNTIME_KEYS} == sweep.RUNTIME_KEYS
    args = ("--train.max_iters", "8", "--train.eval_interval", "4")
    whole = run(tiny(tmp_path / "whole", *args), log=None)
    real_save = TL.save_torch

    def save_then_die(path, obj):
        real_save(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(TL, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path / "cut", *args, "--train.device", "cpu"), log=None)
    monkeypatch.setattr(TL, "save_torch", real_save)
    ckpt_path = tmp_path / "cut" / T.CHECKPOINT
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["state"]["iter"] == 4 and "device" not in ckpt["config"]["train"]
    # a checkpoint written while the device was still in the fingerprint resumes too
    ckpt["config"]["train"]["device"] = "cpu"
    torch.save(ckpt, ckpt_path)
    messages: list[str] = []
    resumed = run(tiny(tmp_path / "cut", *args, "--train.device", "cpu:0"), log=messages.append)
    assert messages[0] == f"resumed from {ckpt_path} at iteration 4"
    assert resumed["history"] == whole["history"] and resumed["iters"] == 8
    with pytest.raises(CheckpointError, match=r"differs in train\.seed\)"):
        run(tiny(tmp_path / "cut", *args, "--train.seed", "1"), log=None)


# ------------------------------------------------------------- every optimizer in the loop


@pytest.mark.parametrize("name", ["adamw", "sgd", "adopt", "lamb", "lion", "sophia"])
def test_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name):
    """Stop a run right after its first checkpoint (the save raises, as a kill would), rerun
    it, and compare with an uninterrupted run: identical curves and weights."""
    args = (
        "--optimizer",
        name,
        "--train.max_iters",
        "12",
        "--train.eval_interval",
        "4",
        "--train.warmup_iters",
        "2",
        "--optim.hessian_interval",
        "3",
        "--model.dropout",
        "0.1",
    )
    whole = run(tiny(tmp_path / "whole", *args), log=None)

    real_save, calls = TL.save_torch, []

    def save_then_die(path, obj):
        real_save(path, obj)
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(TL, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path / "cut", *args), log=None)
    monkeypatch.setattr(TL, "save_torch", real_save)
    assert torch.load(calls[0], weights_only=True)["state"]["iter"] == 4
    resumed = run(tiny(tmp_path / "cut", *args), log=None)
    assert resumed["history"] == whole["history"]
    a = torch.load(tmp_path / "whole" / T.WEIGHTS, weights_only=True)
    b = torch.load(tmp_path / "cut" / T.WEIGHTS, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name == "sophia":
        rates = [r for _, r in whole["history"]["win_rate"]]
        assert len(rates) == 3 and all(0.0 <= r <= 1.0 for r in rates)
    else:
        assert whole["history"]["win_rate"] == []


@pytest.mark.parametrize("spectral", [False, True])
def test_sophia_estimates_its_hessian_even_when_wrapped(tmp_path: Path, spectral: bool):
    """The training loop reaches Sophia's estimator through SpectralNormalized too: after
    hessian_interval steps h is nonzero, and the run logs win rates (a wrapper that hid
    ``hessian_interval`` left Sophia running as sign-momentum, h ≡ 0)."""
    args = ["--optimizer", "sophia", "--train.max_iters", "6", "--train.eval_interval", "3"]
    args += ["--optim.hessian_interval", "2", "--optim.spectral_normalize", str(spectral).lower()]
    cfg = tiny(tmp_path, *args)
    result = run(cfg, log=None)
    assert len(result["history"]["win_rate"]) == 2
    model = T.build_model(cfg, 65)
    opt = T.build_run_optimizer(cfg, model)
    assert opt.hessian_interval == 2
    ckpt = torch.load(tmp_path / T.CHECKPOINT, weights_only=True)
    hessians = [s["hessian"] for s in ckpt["optimizer"]["state"].values() if "hessian" in s]
    assert hessians and all(h.abs().sum() > 0 for h in hessians if h.ndim >= 2)


def test_checkpoints_and_ids_from_before_later_keys_still_match(tmp_path: Path) -> None:
    """A GPT checkpoint's stored config has no model.arch (written before the Llama), and
    none of the transferable-HP multipliers (written before issue 13): it still matches the
    config that wrote it, and the run keeps its id; a Llama, or a multiplier other than 1,
    is another run."""
    cfg = tiny(tmp_path / "a")
    old = cfg.to_dict()
    del old["model"]["arch"]
    for key in ("lr_input", "lr_output", "lr_vector", "readout_scale", "init_input",
                "init_output", "attention_mult"):  # fmt: skip
        del old["param"][key]
    assert T.fingerprint(old) == T.fingerprint(cfg)
    assert sweep.run_id(cfg) == sweep.run_id(build_config(old))
    llama = tiny(tmp_path / "a", "--model.arch", "llama", "--model.n_heads", "2")
    assert T.fingerprint(llama) != T.fingerprint(cfg)
    assert sweep.run_id(llama) != sweep.run_id(cfg)
    for key in ("lr_input", "readout_scale", "attention_mult"):
        other = tiny(tmp_path / "a", f"--param.{key}", "2.0")
        assert sweep.run_id(other) != sweep.run_id(cfg), key


_REFAULTS = """
import resource, sys, torch
from spectral_mup.train import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
torch.ones(1 << 24).sum()  # 64 MiB, written (every page faulted in), freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(1 << 24).sum()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_refaulting_freed_blocks() -> None:
    """glibc hands a freed 64 MiB block back to the OS, so each of 20 later ones faults in
    its 16k pages again; after keep_freed_memory (what ``smup`` and sweep workers call) freed
    blocks are reused and their pages stay. Opt out with SMUP_KEEP_FREED_MEMORY=0."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory tunes glibc's malloc; this libc is not glibc")

    def faults(keep: str, env: dict[str, str] | None = None) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", _REFAULTS, keep],
            capture_output=True, text=True, check=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        applied, count = out.stdout.split()
        return int(applied), int(count)

    (_, plain), (applied, kept) = faults("0"), faults("1")
    assert applied == 1
    # 16384 4 KiB pages per block: without it every block faults in again; with it the heap
    # may grow by a block or two while it settles (16384 in one fresh clone, 0 here), no more
    assert plain > 10 * 16384, plain
    assert kept <= 3 * 16384, kept
    assert faults("1", {"SMUP_KEEP_FREED_MEMORY": "0"})[0] == 0
