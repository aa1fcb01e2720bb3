"""Tests for the ``smup`` command line: user mistakes are one line on stderr and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spectral_mup.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TOML = """\
[model]
width = 32
depth = 1
n_heads = 2
block_size = 32

[param]
base_width = 32
base_depth = 1

[train]
batch_size = 4
max_iters = 2
warmup_iters = 0
eval_interval = 2
eval_iters = 2
progress = false
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML, encoding="utf-8")
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def _empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def fail(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main(argv)``; assert exit 2 and exactly one ``smup: error:`` line on stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("smup: error: "), lines[0]
    assert captured.out == ""
    return lines[0]


def train_fail(
    capsys: pytest.CaptureFixture[str], cfg_file: Path, out_dir: Path, *overrides: str
) -> str:
    msg = fail(capsys, ["train", str(cfg_file), "--train.out_dir", str(out_dir), *overrides])
    assert _empty(out_dir), sorted(p.name for p in out_dir.iterdir())
    return msg


def coord_fail(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> str:
    out = tmp_path / "coord"
    msg = fail(capsys, ["coord-check", "--out", str(out), "--quiet", *args])
    assert _empty(out)
    return msg


# ----------------------------------------------------------------------------- a good run


def test_tiny_train_run_succeeds(
    capsys: pytest.CaptureFixture[str], cfg_file: Path, out_dir: Path
) -> None:
    assert main(["train", str(cfg_file), "--train.out_dir", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].startswith("iter 2: train ")
    assert lines[-1].startswith("ok (max_iters) after 2 iterations; best val loss ")
    assert lines[-1].endswith(f"at iteration 2; wrote {out_dir / 'result.json'}")
    result = json.loads((out_dir / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["stop_reason"] == "max_iters"
    assert result["iters"] == 2
    assert result["tokens"] == 2 * 4 * 32
    assert len(result["history"]["train_loss"]) == 2
    assert [v[0] for v in result["history"]["val"]] == [2]
    assert result["config"]["model"]["width"] == 32
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "checkpoint.pt",
        "model.pt",
        "result.json",
    ]


# ----------------------------------------------------------------------------- optimizer


def test_train_unknown_optimizer(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--optim.name", "adamx")
    assert "unknown optimizer 'adamx'" in msg
    assert "adamw" in msg and "sgd" in msg


def test_coord_check_unknown_optimizer(capsys, tmp_path) -> None:
    msg = coord_fail(capsys, tmp_path, "--optimizer", "adamx")
    assert "unknown optimizer 'adamx'" in msg


# ----------------------------------------------------------------------------- shapes


def test_train_width_not_divisible_by_heads(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--model.width", "30", "--model.n_heads", "4")
    assert msg == (
        "smup: error: model.width 30 is not divisible by model.n_heads 4; "
        "pick a width that is a multiple of n_heads"
    )


def test_coord_check_width_not_divisible_by_heads(capsys, tmp_path) -> None:
    msg = coord_fail(capsys, tmp_path, "--widths", "30,64", "--n-heads", "4")
    assert msg == (
        "smup: error: model.width 30 is not divisible by model.n_heads 4; "
        "pick a width that is a multiple of n_heads"
    )


@pytest.mark.parametrize("flag", ["--widths", "--depths"])
def test_coord_check_needs_two_sizes(capsys, tmp_path, flag) -> None:
    """One size cannot give a slope: a one-line error and exit 2, not NaN slopes."""
    msg = coord_fail(capsys, tmp_path, flag, "64")
    assert (
        msg == f"smup: error: {flag} needs at least two different sizes to fit a slope, e.g. 64,128"
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("--model.width", "0", "model.width must be a positive integer, got 0"),
        ("--model.depth", "-1", "model.depth must be a positive integer, got -1"),
        ("--param.base_width", "0", "base_width must be a positive integer, got 0"),
        ("--param.base_depth", "0", "base_depth must be a positive integer, got 0"),
        ("--train.batch_size", "0", "train.batch_size must be a positive integer, got 0"),
    ],
)
def test_train_non_positive_sizes(capsys, cfg_file, out_dir, key, value, expected) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, key, value)
    assert msg == f"smup: error: {expected}"


def test_train_non_positive_depth_with_equals(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--model.depth=-1")
    assert msg == "smup: error: model.depth must be a positive integer, got -1"


def test_coord_check_non_positive_width(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["coord-check", "--out", str(tmp_path / "coord"), "--widths", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "expected positive integers, got '0'" in err


def test_coord_check_non_positive_steps(capsys, tmp_path) -> None:
    msg = coord_fail(capsys, tmp_path, "--steps", "0")
    assert msg == "smup: error: --steps must be a positive integer"


# ----------------------------------------------------------------------------- data


def test_train_missing_data_file(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--data.path", "/nonexistent/x.txt")
    assert msg.startswith("smup: error: data path /nonexistent/x.txt does not exist")


def test_train_non_utf8_text(capsys, cfg_file, out_dir, tmp_path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello world, caf\xe9 " * 100)
    msg = train_fail(capsys, cfg_file, out_dir, "--data.path", str(bad))
    assert f"{bad} is not UTF-8 text (invalid byte at offset 16)" in msg


def test_train_odd_sized_bin(capsys, cfg_file, out_dir, tmp_path) -> None:
    d = tmp_path / "tokens"
    d.mkdir()
    (d / "train.bin").write_bytes(b"\x01\x00\x02")
    (d / "val.bin").write_bytes(b"\x01\x00\x02\x00")
    (d / "meta.json").write_text('{"vocab_size": 4}')
    msg = train_fail(capsys, cfg_file, out_dir, "--data.path", str(d))
    assert f"{d / 'train.bin'} is corrupt: its size 3 bytes is odd" in msg


# ----------------------------------------------------------------------------- checkpoints


def test_train_corrupt_checkpoint(capsys, cfg_file, out_dir) -> None:
    out_dir.mkdir()
    garbage = b"\x00not a checkpoint\xff" * 10
    (out_dir / "checkpoint.pt").write_bytes(garbage)
    msg = fail(capsys, ["train", str(cfg_file), "--train.out_dir", str(out_dir)])
    assert "corrupt" in msg
    assert f"checkpoint {out_dir / 'checkpoint.pt'} is corrupt or unreadable" in msg
    assert msg.endswith("delete it to start over")
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoint.pt"]
    assert (out_dir / "checkpoint.pt").read_bytes() == garbage


def test_train_checkpoint_from_other_config(capsys, cfg_file, out_dir) -> None:
    argv = ["train", str(cfg_file), "--train.out_dir", str(out_dir)]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    msg = fail(capsys, [*argv, "--optim.lr", "0.001"])
    assert "was written by a different config (differs in optim.lr)" in msg
    assert "--train.resume false" in msg
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


# ----------------------------------------------------------------------------- data


def test_data_writes_a_whole_directory_and_keeps_other_files(capsys, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 40, encoding="utf-8")
    out = tmp_path / "tok"
    for _ in range(2):  # a new directory, then the same one again: replaced as a whole
        assert main(["data", str(text), "--out", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {out}/train.bin (")
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt", "tok"]  # nothing left over
    (out / "input.txt").write_text("keep", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = fail(capsys, ["data", str(text), "--out", str(out)])
    assert f"{out} holds 'input.txt', which prepare_bin did not write" in msg
    assert msg.endswith("pass a new or empty output directory")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- config


def test_unknown_key_in_toml(capsys, tmp_path, out_dir) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlrr = 1\n")
    msg = train_fail(capsys, cfg, out_dir)
    assert msg.startswith("smup: error: unknown config key 'train.lrr'; valid keys in [train]:")
    assert "max_iters" in msg


def test_unknown_key_override(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--train.lrr", "1")
    assert msg.startswith("smup: error: unknown config key 'train.lrr'")


def test_unknown_section_in_toml(capsys, tmp_path, out_dir) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[trian]\nmax_iters = 1\n")
    msg = train_fail(capsys, cfg, out_dir)
    assert (
        msg == "smup: error: unknown config section [trian]; use model, param, optim, train, data"
    )


def test_malformed_toml(capsys, tmp_path, out_dir) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train\nmax_iters = \n")
    msg = train_fail(capsys, cfg, out_dir)
    assert msg.startswith(f"smup: error: config {cfg} is not valid TOML: ")


def test_wrong_type_override(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--train.max_iters", "abc")
    assert msg.startswith("smup: error: train.max_iters must be of type")
    assert msg.endswith("got 'abc'")


def test_wrong_type_in_toml(capsys, tmp_path, out_dir) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[train]\nmax_iters = "ten"\n')
    msg = train_fail(capsys, cfg, out_dir)
    assert msg.startswith("smup: error: train.max_iters must be of type")
    assert msg.endswith("got 'ten'")


def test_missing_config_file(capsys, tmp_path, out_dir) -> None:
    missing = tmp_path / "nope.toml"
    msg = train_fail(capsys, missing, out_dir)
    assert msg == f"smup: error: config file {missing} does not exist"


def test_depth_alpha_not_allowed(capsys, cfg_file, out_dir) -> None:
    msg = train_fail(capsys, cfg_file, out_dir, "--param.depth_alpha", "0.7")
    assert msg == "smup: error: depth_alpha must be one of 0, 0.5, 1, got 0.7"


def test_override_missing_value(capsys, cfg_file, out_dir) -> None:
    msg = fail(capsys, ["train", str(cfg_file), "--train.out_dir", str(out_dir), "--optim.lr"])
    assert msg == "smup: error: override --optim.lr needs a value"
    assert not out_dir.exists()


# ----------------------------------------------------------------------------- real process


def test_subprocess_exit_status(cfg_file: Path, out_dir: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "spectral_mup.cli", "train", str(cfg_file)),
            *("--train.out_dir", str(out_dir), "--train.lrr", "1"),
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("smup: error: unknown config key 'train.lrr'")
    assert not out_dir.exists()


def test_coord_check_bad_model_option(capsys, tmp_path) -> None:
    msg = coord_fail(capsys, tmp_path, "--arch", "llama", "--model", "mlp_ratio=4")
    assert msg.startswith("smup: error: --model needs KEY=VALUE with KEY one of: n_heads,")
    assert "ffn_ratio" in msg and "mlp_ratio" not in msg.split("got")[0]
    msg = coord_fail(capsys, tmp_path, "--arch", "mamba")
    assert msg == "smup: error: model.arch must be one of gpt, llama, got 'mamba'"


def test_commands_other_than_train_refuse_torchrun(capsys, tmp_path, monkeypatch) -> None:
    """Under torchrun every rank would run the whole sweep into the same store."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = fail(capsys, ["sweep", str(tmp_path / "spec.toml")])
    assert msg == (
        "smup: error: smup sweep runs in one process (sweeps start their own workers); "
        "launch it without torchrun — only smup train runs on several ranks"
    )
    assert not list(tmp_path.iterdir())
