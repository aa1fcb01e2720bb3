"""Tests for spectral_mup.sweep: run ids, spec validation, divergence and failure as results,
skipping stored runs, SIGKILL + resume, and the Ray executor."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spectral_mup import sweep as S
from spectral_mup.cli import main
from spectral_mup.config import load_config
from spectral_mup.store import RunStore
from spectral_mup.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = """\
[overrides]
"model.n_heads" = 2
"model.block_size" = 16
"param.base_width" = 16
"param.base_depth" = 1
"train.batch_size" = 4
"train.eval_iters" = 2
"""


def write_spec(
    root: Path,
    grid: str,
    *,
    budget: str = "steps = 20",
    overrides: str = "",
    sweep: str = "",
    name: str = "t",
) -> Path:
    """A tiny sweep spec under ``root``, with its store and run dirs under ``root`` too."""
    root.mkdir(parents=True, exist_ok=True)
    if "warmup_iters" not in overrides:
        overrides += '"train.warmup_iters" = 2\n'
    spec = root / "spec.toml"
    spec.write_text(
        f'[sweep]\nname = "{name}"\nstore = "{(root / "store.sqlite").as_posix()}"\n'
        f'out_dir = "{(root / "runs").as_posix()}"\n{sweep}\n'
        f"[grid]\n{grid}\n\n[budget]\n{budget}\n\n{OVERRIDES}{overrides}\n",
        encoding="utf-8",
    )
    return spec


def by_id(store: Path) -> dict[str, dict]:
    with RunStore(store, create=False) as s:
        return {r["id"]: r for r in s.rows()}


def results(rows: dict[str, dict]) -> dict[str, tuple]:
    keys = ("status", "best_val_loss", "final_val_loss", "train_loss", "diverged_step", "iters")
    return {i: tuple(r[k] for k in keys) for i, r in rows.items()}


# ----------------------------------------------------------------------------- run ids


def test_run_ids_outlive_new_config_keys():
    """A stored run keeps its id when a later version adds a config key at the value that
    trains it as before (train.LATER_KEYS, or an optional key left unset): ids computed by
    the code of 2026-12-02, before the GPT's model.position existed."""
    base = ["--model.width", "32", "--model.depth", "1", "--model.n_heads", "2"]
    base += ["--param.base_width", "16"]
    assert S.run_id(load_config(None, base)) == "3f7bed24b56079cb"
    assert S.run_id(load_config(None, [*base, "--model.arch", "llama"])) == "e68e02bb50855c4d"
    rotary = load_config(None, [*base, "--model.position", "rotary"])
    assert S.run_id(rotary) != "3f7bed24b56079cb"


def test_run_ids_are_deterministic_and_differ_with_every_hyperparameter(tmp_path):
    base = [
        "--model.width",
        "32",
        "--model.depth",
        "1",
        "--model.n_heads",
        "2",
        "--param.base_width",
        "16",
    ]
    cfg = load_config(None, base)
    same = [
        ["--train.out_dir", "elsewhere"],
        ["--train.progress", "false"],
        ["--train.resume", "false"],
        ["--train.device", "cuda"],
    ]
    for extra in same:  # runtime-only keys
        assert S.run_id(load_config(None, base + extra)) == S.run_id(cfg), extra
    changes = [
        ["--optim.lr", "0.004"],
        ["--optim.weight_decay", "0.1"],
        ["--optim.name", "lion"],
        ["--optim.eps", "1e-9"],
        ["--model.width", "64"],
        ["--model.depth", "2"],
        ["--param.kind", "sp"],
        ["--param.depth_alpha", "0.5"],
        ["--param.base_width", "32"],
        ["--train.seed", "1"],
        ["--train.batch_size", "8"],
        ["--train.max_iters", "7"],
        ["--data.path", "other.txt"],
    ]
    ids = [S.run_id(load_config(None, base + extra)) for extra in changes]
    assert len(set(ids)) == len(ids) and S.run_id(cfg) not in ids
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)

    spec = write_spec(
        tmp_path,
        'param = ["sp", "mup"]\ndepth_alpha = [0.5, 1.0]\nwidth = [16, 32]\ndepth = 1\n'
        "lr = { log2_min = -9, log2_max = -7, step = 1 }\nseed = [0, 1]",
        budget="tokens = 1000",
    )
    runs = S.load_spec(spec).runs
    # SP runs are not repeated over α: (1 SP + 2 μP) × 2 widths × 3 LRs × 2 seeds
    assert len(runs) == 3 * 2 * 3 * 2 == len({r.id for r in runs})
    assert sorted({r.config.optim.lr for r in runs}) == [2.0**-9, 2.0**-8, 2.0**-7]
    assert {r.config.param.depth_alpha for r in runs if r.config.param.kind == "sp"} == {0.0}
    assert {r.config.train.max_iters for r in runs} == {math.ceil(1000 / (4 * 16))}
    for r in runs:
        assert r.id == S.run_id(r.config)
        assert Path(r.config.train.out_dir) == tmp_path / "runs" / r.id
        assert not r.config.train.progress and r.config.train.resume
    assert [r.id for r in S.load_spec(spec).runs] == [r.id for r in runs]
    # another process, another hash seed, another working directory: the same ids
    code = (
        "from spectral_mup.sweep import load_spec; "
        f"print(*[r.id for r in load_spec({str(spec)!r}).runs])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [r.id for r in runs]
    assert not (tmp_path / "store.sqlite").exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad specs

GOOD_GRID = "width = [16, 32]\nlr = [0.01]"


@pytest.mark.parametrize(
    ("grid", "extra", "message"),
    [
        (GOOD_GRID, "[sweep2]\n", "unknown table 'sweep2'"),
        ("widths = [16]", "", "unknown key in [grid] 'widths'"),
        ("", "", "the [grid] table is empty"),
        ("width = []", "", "grid.width is an empty list"),
        ("lr = { log2_min = -4, log2_max = -12, step = 1 }", "", "is above log2_max"),
        ("lr = { log2_min = -12, log2_max = -4, step = 0 }", "", "step must be a number > 0"),
        ("lr = { log2_min = -12, log2_max = -4 }", "", "needs exactly log2_min, log2_max"),
        ('optimizer = ["adamw", "adamz"]', "", "unknown optimizer 'adamz'"),
        ("width = [16, 33]", "", "model.width 33 is not divisible by model.n_heads 2"),
        ('param = ["mup", "ntk"]', "", "grid.param values are sp or mup"),
        ("depth_alpha = [0.7]", "", "depth_alpha must be one of 0, 0.5, 1"),
        ('width = ["wide"]', "", "model.width must be of type int"),
        (GOOD_GRID, '"train.max_itres" = 5\n', "unknown config key 'train.max_itres'"),
        (GOOD_GRID, '"optim.lr" = 0.1\n', "in both [grid] (lr) and [overrides]"),
        (GOOD_GRID, '"train.out_dir" = "x"\n', "set [sweep] out_dir"),
        (GOOD_GRID, '"model.vocab_size" = 70\n', "model.vocab_size is set from the data"),
        ('"param.lr_inptu" = [1, 2]', "", "unknown config key 'param.lr_inptu'"),
        ('"param.lr_input" = [0.0]', "", "lr_input must be a finite number > 0"),
        ("lr_input = [1, 2]", "", "use a grid key"),
        ('"train.progress" = [true]', "", "cannot be swept"),
        ('lr = [0.01]\n"optim.lr" = [0.02]', "", "grid key lr is given twice"),
        (
            GOOD_GRID,
            '[search]\ntrials = 2\n"optim.lr" = [0.1]\n',
            "lr is in both [grid] and [search]",
        ),
        ("width = 16", '[search]\ntrials = 0\n"optim.lr" = [0.1]\n', "search.trials must be"),
        ("width = 16", "[search]\ntrials = 2\n", "[search] samples nothing"),
        (
            "width = 16",
            '[search]\ntrials = 2\n"optim.lr" = { log2_min = -2 }\n',
            "search.lr must be",
        ),
        ("width = 16", '[search]\ntrials = 2\n"optim.lr" = { min = 2, max = 1 }\n', "min <= max"),
        ('arch = "mamba"', "", "model.arch must be one of gpt, llama, got 'mamba'"),
        (
            'arch = ["gpt", "llama"]',
            '"model.bias" = false\n',
            "model.bias = False is set for the gpt model, which the llama model does not have",
        ),
    ],
)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, grid, extra, message):
    table = extra.startswith("[")  # a whole table, not override keys
    spec = write_spec(tmp_path, grid, overrides="" if table else extra)
    if table:
        spec.write_text(spec.read_text() + extra)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smup: error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]  # no store, no run dirs


@pytest.mark.parametrize(
    ("sweep", "budget", "message"),
    [
        ('base = "missing.toml"', "steps = 5", "sweep.base: config file"),
        ("workers = -1", "steps = 5", "sweep.workers must be an integer >= 0"),
        ('executor = "slurm"', "steps = 5", "sweep.executor must be local or ray"),
        ("colour = 1", "steps = 5", "unknown key in [sweep] 'colour'"),
        ("", "steps = 5\ntokens = 100", "budget.steps or budget.tokens, not both"),
        ("", "steps = 0", "budget.steps must be an integer >= 1"),
        ("", "epochs = 3", "unknown key in [budget] 'epochs'"),
        ("", "patience = 10\n[overrides.train]\npatience = 5", "in both [budget] (patience)"),
    ],
)
def test_bad_sweep_and_budget_tables(tmp_path, capsys, sweep, budget, message):
    spec = write_spec(tmp_path, GOOD_GRID, sweep=sweep, budget=budget)
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smup: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_missing_and_malformed_spec_files(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "sweep spec" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid\nwidth = 1\n")
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid TOML" in err and err.count("\n") == 1


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    spec = write_spec(tmp_path, "width = 16\nlr = 0.01")
    assert main(["sweep", str(spec), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'spectral-mup[ray]'" in err
    assert not (tmp_path / "store.sqlite").exists()


def test_unreachable_ray_address_fails_fast(tmp_path, capsys):
    import ray  # noqa: F401  (a test extra: fail, never skip, when it is missing)

    spec = write_spec(tmp_path, "width = 16\nlr = 0.01")
    start = time.monotonic()
    assert main(["sweep", str(spec), "--executor", "ray", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in err
    assert time.monotonic() - start < 15 and not (tmp_path / "store.sqlite").exists()


def test_any_config_key_is_a_grid_key(tmp_path, capsys):
    """A quoted dotted key sweeps any config value (here a transferable HP) like a short key:
    its values reach the runs' configs, change their ids and can be picked with --only."""
    grid = 'width = 16\nlr = [0.004, 0.008]\n"param.lr_input" = [0.5, 2.0]\n'
    grid += "[grid.param]\nreadout_scale = { log2_min = -1, log2_max = 1, step = 1 }"
    spec = S.load_spec(write_spec(tmp_path, grid))
    assert len(spec.runs) == 2 * 2 * 3 and len({r.id for r in spec.runs}) == 12
    got = {(r.config.optim.lr, r.config.param.lr_input, r.config.param.readout_scale)
           for r in spec.runs}  # fmt: skip
    assert got == {(lr, a, c) for lr in (0.004, 0.008) for a in (0.5, 2.0) for c in (0.5, 1, 2)}
    assert all(r.point["param.lr_input"] == r.config.param.lr_input for r in spec.runs)
    picked = S.restrict(spec, ["param.lr_input=2"])
    assert {r.config.param.lr_input for r in picked.runs} == {2.0} and len(picked.runs) == 6
    assert main(["sweep", str(spec.path), "--dry-run"]) == 0
    assert "param.lr_input=0.5 param.readout_scale=2" in capsys.readouterr().out


def test_random_search_samples_seeded_trials(tmp_path):
    """[search]: `trials` samples, reproducible from the spec alone (same spec, same ids on
    any machine), each one shared by every grid point (here both seeds), within its bounds
    and rounded to 4 significant digits; another sampler seed gives other trials."""
    space = (
        '"optim.lr" = { log2_min = -10, log2_max = -4 }\n'
        '"param.readout_scale" = { min = 0.5, max = 2.0 }\n'
        '"param.attention_mult" = [0.5, 2]\n'
    )

    def spec_with(seed):
        root = tmp_path / str(seed)
        path = write_spec(root, "width = 16\nseed = [0, 1]")
        path.write_text(path.read_text() + f"[search]\ntrials = 6\nseed = {seed}\n{space}")
        return S.load_spec(path)

    spec = spec_with(0)
    assert len(spec.runs) == 12
    assert [r.id for r in spec.runs] == [r.id for r in spec_with(0).runs]
    by_trial = {}
    for r in spec.runs:
        c = r.config
        sample = (c.optim.lr, c.param.readout_scale, c.param.attention_mult)
        assert by_trial.setdefault(r.point["trial"], sample) == sample  # same at both seeds
        assert 2**-10 <= c.optim.lr <= 2**-4 and 0.5 <= c.param.readout_scale <= 2.0
        assert c.param.attention_mult in (0.5, 2) and float(f"{c.optim.lr:.4g}") == c.optim.lr
    assert sorted(by_trial) == list(range(6)) and len(set(by_trial.values())) == 6
    other = {(r.config.optim.lr, r.config.param.readout_scale) for r in spec_with(1).runs}
    assert other.isdisjoint({s[:2] for s in by_trial.values()})
    assert len(S.restrict(spec, ["trial=3"]).runs) == 2


# ----------------------------------------------------------------------------- results


def test_diverging_lr_is_stored_as_diverged_and_the_rest_are_ok(tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        'param = ["sp", "mup"]\nwidth = [16, 32]\ndepth = 1\nlr = [0.0078125, 10.0]',
        overrides='"train.warmup_iters" = 0\n"train.loss_ceiling" = 5.0\n',
        sweep="workers = 2\nkeep_weights = true",  # through the process pool
    )
    assert main(["sweep", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "4 ok, 4 diverged, 0 failed, 0 skipped (already stored) of 8 runs" in out
    rows = by_id(tmp_path / "store.sqlite")
    assert len(rows) == 8
    for r in rows.values():
        if r["lr"] == 10.0:
            assert r["status"] == "diverged" and r["error"] is None
            assert isinstance(r["diverged_step"], int) and 0 <= r["diverged_step"] < 20
            assert r["iters"] == r["diverged_step"]
        else:
            assert r["status"] == "ok" and r["diverged_step"] is None and r["iters"] == 20
            assert r["tokens"] == 20 * 4 * 16
            assert 2.0 < r["best_val_loss"] < math.log(65)  # it learned something
            assert r["best_val_loss"] <= r["final_val_loss"]
            files = {p.name for p in (tmp_path / "runs" / r["id"]).iterdir()}
            assert files == {"checkpoint.pt", "model.pt", "result.json"}  # keep_weights
    # a row holds exactly what train.run returns for that config
    one = next(r for r in rows.values() if r["status"] == "ok" and r["param"] == "mup")
    cfg = next(x for x in S.load_spec(spec).runs if x.id == one["id"]).config
    train = dataclasses.replace(cfg.train, out_dir=str(tmp_path / "again"))
    again = run(dataclasses.replace(cfg, train=train), log=None)
    assert (again["best_val_loss"], again["final_val_loss"]) == (
        one["best_val_loss"],
        one["final_val_loss"],
    )
    assert one["config"]["optim"]["lr"] == 0.0078125 and one["config"]["model"]["width"] in (16, 32)


def test_failing_run_is_stored_as_failed_and_the_sweep_goes_on(tmp_path):
    spec_path = write_spec(
        tmp_path, 'param = ["sp", "mup"]\nwidth = 16\ndepth = 1\nlr = [0.004, 0.008]'
    )
    spec = S.load_spec(spec_path)
    broken = spec.runs[1]
    # a run dir holding a corrupt checkpoint: train.run raises CheckpointError in the worker
    Path(broken.config.train.out_dir).mkdir(parents=True)
    (Path(broken.config.train.out_dir) / "checkpoint.pt").write_bytes(b"not a checkpoint")
    summary = S.run_sweep(spec, workers=2, progress=False)
    assert summary.counts == {"ok": 3, "diverged": 0, "failed": 1} and summary.skipped == 0
    rows = by_id(spec.store)
    assert len(rows) == 4
    bad = rows[broken.id]
    assert bad["status"] == "failed" and bad["best_val_loss"] is None and bad["iters"] is None
    assert bad["error"].startswith("CheckpointError: checkpoint ") and "corrupt" in bad["error"]
    assert "\n" not in bad["error"]
    assert (bad["width"], bad["lr"], bad["param"]) == (16, broken.config.optim.lr, "sp")
    assert (Path(broken.config.train.out_dir) / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    others = [r for i, r in rows.items() if i != broken.id]
    assert all(r["status"] == "ok" and r["iters"] == 20 and r["error"] is None for r in others)


def test_rerun_retries_a_failed_run_once_its_cause_is_fixed(tmp_path, monkeypatch, capsys):
    spec_path = write_spec(
        tmp_path, "width = 16\ndepth = 1\nlr = [0.004, 0.008]", sweep="workers = 1"
    )
    monkeypatch.setattr(S.executors, "available_cores", lambda: 1)  # one thread: busy machine
    spec = S.load_spec(spec_path)
    broken, fine = spec.runs
    corrupt = Path(broken.config.train.out_dir) / "checkpoint.pt"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint")  # the cause: train.run raises CheckpointError
    first = S.run_sweep(spec, progress=False)
    assert (first.counts, first.skipped, first.retried) == (
        {"ok": 1, "diverged": 0, "failed": 1},
        0,
        0,
    )
    before = by_id(spec.store)
    assert before[broken.id]["status"] == "failed"

    assert main(["sweep", str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"retry   {broken.id}" in out and f"stored  {fine.id}" in out
    assert "2 runs, 1 already stored, 1 to run (1 retried: stored as failed)" in out

    corrupt.unlink()  # fix the cause and rerun: the failed run trains, its row is replaced
    assert main(["sweep", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "1 ok, 0 diverged, 0 failed, 1 skipped (already stored) of 2 runs" in out
    assert "; 1 retried (stored as failed before)" in out
    after = by_id(spec.store)
    assert len(after) == 2 and after[fine.id] == before[fine.id]  # a result is never rerun
    retried = after[broken.id]
    assert (retried["status"], retried["error"], retried["iters"]) == ("ok", None, 20)
    assert retried["best_val_loss"] is not None

    again = S.run_sweep(S.load_spec(spec_path), progress=False)  # nothing left to retry
    assert (again.ran, again.skipped, again.retried) == (0, 2, 0)
    with RunStore(spec.store) as store:  # an ok row is a result: add never replaces it
        assert not store.add({**retried, "status": "failed", "error": "E"})
        assert store.statuses() == {broken.id: "ok", fine.id: "ok"}


def test_rerun_skips_stored_runs_and_runs_only_new_ones(tmp_path, monkeypatch, capsys):
    grid = "width = [16, 32]\ndepth = 1\nlr = [0.004, 0.008]"
    spec_path = write_spec(tmp_path, grid, sweep="workers = 1")  # in-process
    monkeypatch.setattr(S.executors, "available_cores", lambda: 1)  # one thread: busy machine
    calls = []  # every run trained, alone or in a stack
    task = S.executors.execute_task
    monkeypatch.setattr(S.executors, "execute_task", lambda cfgs: calls.extend(cfgs) or task(cfgs))
    first = S.run_sweep(S.load_spec(spec_path), progress=False)
    assert (first.counts["ok"], first.skipped, len(calls)) == (4, 0, 4)
    before = by_id(tmp_path / "store.sqlite")
    for run_dir in (tmp_path / "runs").iterdir():  # stored: checkpoint and weights deleted
        assert [p.name for p in run_dir.iterdir()] == ["result.json"]

    assert main(["sweep", str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("stored  ") == 4 and "4 runs, 4 already stored, 0 to run" in out
    assert main(["sweep", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "0 ok, 0 diverged, 0 failed, 4 skipped (already stored) of 4 runs" in out
    assert len(calls) == 4  # nothing retrained
    assert by_id(tmp_path / "store.sqlite") == before  # not rewritten (finished_at included)

    # one more LR: only its two runs train
    write_spec(tmp_path, grid.replace("0.008]", "0.008, 0.016]"), sweep="workers = 1")
    again = S.run_sweep(S.load_spec(spec_path), progress=False)
    assert (again.counts["ok"], again.skipped, again.total) == (2, 4, 6)
    assert [c.optim.lr for c in calls[4:]] == [0.016, 0.016]
    after = by_id(tmp_path / "store.sqlite")
    assert len(after) == 6 and {i: after[i] for i in before} == before


# ----------------------------------------------------------------------------- kill safety


def _rows_now(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkilled_sweep_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path):
    grid = 'param = ["sp", "mup"]\nwidth = [16, 32]\ndepth = 1\nlr = [0.004, 0.016]'
    kw = dict(
        budget="steps = 60",
        overrides='"train.eval_interval" = 10\n',
        sweep="workers = 2\nbatch_runs = 1",
    )  # one run per task: each checkpoints
    killed = write_spec(tmp_path / "killed", grid, **kw)
    spec = S.load_spec(killed)
    store, out_dir, total = spec.store, spec.out_dir, len(spec.runs)
    cmd = [sys.executable, "-m", "spectral_mup.cli", "sweep", str(killed)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while True:  # at least one row stored and a run checkpointed midway
            in_flight = [
                d.name
                for d in (out_dir.iterdir() if out_dir.exists() else [])
                if (d / "checkpoint.pt").exists() and not (d / "result.json").exists()
            ]
            if 1 <= _rows_now(store) < total and in_flight:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sweep ended (rc {proc.returncode}) before it could be killed")
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool workers
        proc.communicate()
    stored = _rows_now(store)
    assert proc.returncode == -signal.SIGKILL and 1 <= stored < total

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ran = total - stored
    assert f"skipped (already stored) of {total} runs" in rerun.stdout
    assert f"failed, {stored} skipped" in rerun.stdout and f"{ran} ok" in rerun.stdout

    clean = S.load_spec(write_spec(tmp_path / "clean", grid, **kw))
    summary = S.run_sweep(clean, progress=False)
    assert summary.counts["ok"] == total

    got, want = by_id(store), by_id(clean.store)
    assert sorted(got) == sorted(want) == sorted(r.id for r in spec.runs)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM runs").fetchone() == (
            total,
            total,
        )
    assert results(got) == results(want)  # bit-identical losses, statuses, iterations
    assert all(want[i]["status"] == "ok" for i in in_flight)  # killed midway, then resumed


def _pool_workers(pid: int) -> set[int]:
    """Live multiprocessing spawn workers whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if fields[0] != "Z" and int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_to_the_driver_stops_its_pool_workers(tmp_path):
    """`kill PID` (SIGTERM) of the driver alone, not its process group: its spawn workers
    must not outlive it (before the fix they trained on, orphaned, for hours)."""
    grid = 'param = ["sp", "mup"]\nwidth = [16, 32]\ndepth = 1\nlr = [0.004, 0.016]'
    spec = write_spec(tmp_path, grid, budget="steps = 100000", sweep="workers = 2")
    cmd = [sys.executable, "-m", "spectral_mup.cli", "sweep", str(spec)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while len(workers := _pool_workers(proc.pid)) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sweep ended (rc {proc.returncode}) before its workers started")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the driver only
        proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "pool workers outlived the driver"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert _rows_now(S.load_spec(spec).store) == 0  # nothing finished: nothing stored


# ----------------------------------------------------------------------------- Ray


def test_ray_executor_gives_the_rows_of_the_local_executor(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(S.executors, "available_cores", lambda: 1)  # as in each Ray task
    grid = 'param = ["sp", "mup"]\nwidth = 16\ndepth = 1\nlr = [0.008, 10.0]'
    kw = dict(overrides='"train.warmup_iters" = 0\n"train.loss_ceiling" = 5.0\n')
    local = S.load_spec(write_spec(tmp_path / "local", grid, **kw))
    remote = S.load_spec(write_spec(tmp_path / "ray", grid, **kw))
    assert S.run_sweep(local, workers=1, progress=False).counts == {
        "ok": 2,
        "diverged": 2,
        "failed": 0,
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = S.run_sweep(remote, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert summary.counts == {"ok": 2, "diverged": 2, "failed": 0} and summary.lost == 0
    got, want = by_id(remote.store), by_id(local.store)
    assert results(got) == results(want) and len(got) == 4


# ----------------------------------------------------------------------------- depth sweeps


def test_tiny_depth_sweep_of_both_models_reports_per_model_and_alpha(tmp_path, capsys):
    """A depth grid with α ∈ {0, ½, 1} for the GPT and the Llama in one spec: every run
    trains, each model keeps its own config, and the report has one depth study per
    (model, α) with the depth rules' multipliers in the runs' configs."""
    grid = (
        'arch = ["gpt", "llama"]\nparam = "mup"\ndepth_alpha = [0.0, 0.5, 1.0]\n'
        "width = [16]\ndepth = [1, 2]\nlr = [0.01]"
    )
    spec = write_spec(tmp_path, grid, budget="steps = 6")
    assert main(["sweep", str(spec)]) == 0
    rows = by_id(tmp_path / "store.sqlite")
    assert len(rows) == 12 and {r["status"] for r in rows.values()} == {"ok"}
    archs = {(r["config"]["model"]["arch"], r["depth_alpha"]) for r in rows.values()}
    assert len(archs) == 6
    llama = [r for r in rows.values() if r["config"]["model"]["arch"] == "llama"]
    assert (
        "mlp_ratio" not in llama[0]["config"]["model"]
        and "ffn_ratio" in llama[0]["config"]["model"]
    )
    capsys.readouterr()
    assert main(["report", str(tmp_path / "store.sqlite")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("deeper better SP  deeper better μP")
    summary = json.loads((tmp_path / "store_report" / "summary.json").read_text())
    studies = {(s["arch"], s["depth_alpha"], s["axis"]) for s in summary["studies"]}
    assert studies == {(a, al, "depth") for a in ("gpt", "llama") for al in (0.0, 0.5, 1.0)}


def test_only_restricts_the_runs_by_grid_value(tmp_path, capsys):
    spec = write_spec(tmp_path, 'arch = ["gpt", "llama"]\nwidth = [16, 32]\nlr = [0.01, 0.0078125]')
    assert (
        main(["sweep", str(spec), "--dry-run", "--only", "arch=llama", "--only", "lr=0.0078125"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 1  # 2 widths (μP, the default), and the summary line
    assert all(" llama adamw " in line and "lr=0.007812" in line for line in lines[:-1])
    for bad, message in (("arch", "--only needs KEY=VALUE"), ("colour=red", "--only needs"),
                         ("arch=mamba", "--only arch=mamba matches no run")):  # fmt: skip
        assert main(["sweep", str(spec), "--dry-run", "--only", bad]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_near_best_keeps_the_lrs_near_each_groups_stored_optimum(tmp_path, capsys):
    """--near-best K: per group (runs differing only in LR and seed) the LRs within K grid
    steps of the seed-mean argmin of the stored rows; a diverged seed makes its LR never
    best; a group with an LR not yet stored keeps every run."""
    lrs = [0.001, 0.002, 0.004, 0.008, 0.016]
    spec_path = write_spec(tmp_path, f"width = [16, 32, 48]\nlr = {lrs}\nseed = [0, 1, 2]")
    spec = S.load_spec(spec_path)

    def at(width, lr, seed):
        return next(r for r in spec.runs if r.point == {**r.point, "width": width, "lr": lr,
                                                        "seed": seed})  # fmt: skip

    rows = {}
    # width 16: seed 0 best at 0.008, but seed 1 diverged there -> best 0.016 (mean of seeds
    # 0 and 1 at each LR; seed 2 not stored anywhere, that is fine)
    for lr, (a, b) in zip(lrs, [(3.0, 3.0), (2.8, 2.8), (2.6, 2.6), (2.0, None), (2.5, 2.5)],
                          strict=True):  # fmt: skip
        for seed, loss in ((0, a), (1, b)):
            status = "ok" if loss is not None else "diverged"
            rows[at(16, lr, seed).id] = {"status": status, "best_val_loss": loss}
    # width 32: best at the smallest LR
    for i, lr in enumerate(lrs):
        rows[at(32, lr, 0).id] = {"status": "ok", "best_val_loss": 2.0 + i}
    # width 48: one LR only failed so far -> not judged, every run kept
    for i, lr in enumerate(lrs):
        rows[at(48, lr, 0).id] = {"status": "failed" if i == 2 else "ok", "best_val_loss": 1.0}

    def kept(steps):
        out = S.near_best(spec, steps, rows)
        return {w: sorted({r.point["lr"] for r in out.runs if r.point["width"] == w})
                for w in (16, 32, 48)}  # fmt: skip

    assert kept(1) == {16: [0.008, 0.016], 32: [0.001, 0.002], 48: lrs}
    assert kept(0) == {16: [0.016], 32: [0.001], 48: lrs}
    assert kept(2) == {16: [0.004, 0.008, 0.016], 32: [0.001, 0.002, 0.004], 48: lrs}
    assert len(S.near_best(spec, 1, rows).runs) == 3 * (2 + 2 + 5)  # every seed of a kept LR
    # width 32, a second round: seed 1 (0.1 above seed 0) only at the three LRs around seed
    # 0's best 0.004. A plain seed-mean would take 0.016 (seed 0 only, 2.12 < 2.15); compared
    # on shared seeds, as smup report does, the best stays 0.004
    for lr, a in zip(lrs, (2.5, 2.2, 2.1, 2.15, 2.12), strict=True):
        rows[at(32, lr, 0).id] = {"status": "ok", "best_val_loss": a}
        if lr in (0.002, 0.004, 0.008):
            rows[at(32, lr, 1).id] = {"status": "ok", "best_val_loss": a + 0.1}
    assert kept(0)[32] == [0.004] and kept(1)[32] == [0.002, 0.004, 0.008]

    # CLI: no store yet -> nothing can be judged, all runs listed; bad K is a one-line error
    assert main(["sweep", str(spec_path), "--dry-run", "--near-best", "1", "--only", "seed=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("--near-best 1: 45 of 45 runs") and len(out) == 1 + 15 + 1
    assert main(["sweep", str(spec_path), "--dry-run", "--near-best", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--near-best takes a number of LR grid steps" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


# ----------------------------------------------------------------------------- stacked runs


def _one_and_auto(tmp_path: Path, grid: str, monkeypatch) -> tuple[dict, dict, list[int]]:
    """The grid swept one run per task and with stacking (auto): both stores' rows, and
    the task sizes of the stacked sweep."""
    sizes: list[int] = []
    task = S.executors.execute_task
    monkeypatch.setattr(
        S.executors, "execute_task", lambda cfgs: sizes.append(len(cfgs)) or task(cfgs)
    )
    one = write_spec(tmp_path / "one", grid, sweep="workers = 1\nbatch_runs = 1")
    assert main(["sweep", str(one)]) == 0
    assert set(sizes) == {1}
    sizes.clear()
    assert main(["sweep", str(write_spec(tmp_path / "auto", grid, sweep="workers = 1"))]) == 0
    return (
        by_id(tmp_path / "one" / "store.sqlite"),
        by_id(tmp_path / "auto" / "store.sqlite"),
        sizes,
    )


@pytest.mark.parametrize(
    ("optimizer", "lrs"),
    [("adamw", "[0.004, 0.016, 60.0]"), ("muon", "[0.004, 0.016, 0.064]")],
)
def test_stacked_sweep_rows_equal_single_run_rows(tmp_path, monkeypatch, capsys, optimizer, lrs):
    """batch_runs auto (the default) stacks the tiny runs of one shape (LRs × seeds; an
    AdamW LR that diverges) and the stored rows equal one-run-at-a-time rows: statuses,
    iterations and divergence steps exactly, losses within 1e-5 relative (measured ≤ 1.5e-7:
    batched matmuls round differently; tests/test_batched.py), for an optimizer stepped as
    slices (AdamW) and one stepped per run (Muon). (A run at an LR where training is
    chaotic, neither learning nor diverging, differs by more, as it does between thread
    counts: e.g. Muon at LR 60, 1e-3.)"""
    monkeypatch.setattr(S.executors, "available_cores", lambda: 1)
    grid = f'optimizer = "{optimizer}"\nwidth = [16, 32]\ndepth = 1\nlr = {lrs}\nseed = [0, 1]'
    want, got, sizes = _one_and_auto(tmp_path, grid, monkeypatch)
    assert sorted(sizes) == [6, 6]  # per width: 3 LRs × 2 seeds
    assert sorted(got) == sorted(want) and len(got) == 12
    statuses = {r["status"] for r in got.values()}
    assert statuses == ({"ok", "diverged"} if optimizer == "adamw" else {"ok"})
    for rid, w in want.items():
        g = got[rid]
        assert (g["status"], g["iters"], g["diverged_step"]) == (
            w["status"], w["iters"], w["diverged_step"]
        ), rid  # fmt: skip
        for key in ("best_val_loss", "final_val_loss", "train_loss"):
            if w[key] is None:
                assert g[key] is None
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-5), (rid, key)
        assert g["wall_time"] > 0
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "auto" / "spec.toml"), "--batch-runs", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch-runs must be >= 0" in err and len(err.splitlines()) == 1


def test_stack_plan_groups_runs_of_one_shape(tmp_path):
    """plan: runs of one shape share tasks of at most K (near-equal sizes); auto stacks a
    tiny CPU run (below CPU_STACK_FLOPS per step), not a wide one, never leaves a worker
    without a task, and never stacks runs with dropout or a checkpoint to resume."""
    from spectral_mup.sweep.stacks import CPU_STACK_FLOPS, plan, step_flops

    grid = "width = [16, 512]\ndepth = 1\nlr = [0.001, 0.002, 0.004, 0.008, 0.016]\n"
    spec = S.load_spec(write_spec(tmp_path, grid + "seed = [0, 1]"))
    small = [r for r in spec.runs if r.config.model.width == 16]
    wide = [r for r in spec.runs if r.config.model.width == 512]
    assert step_flops(small[0].config) < CPU_STACK_FLOPS < step_flops(wide[0].config)
    assert sorted(map(len, plan(small, 4, 1))) == [3, 3, 4]
    assert sorted(map(len, plan(small, 0, 1))) == [5, 5]  # auto K = 8 on a CPU
    assert sorted(map(len, plan(small, 0, 5))) == [2, 2, 2, 2, 2]  # a task per worker
    assert sorted(map(len, plan(wide, 0, 1))) == [1] * 10
    assert sorted(map(len, plan(spec.runs, 1, 1))) == [1] * 20
    assert sorted(map(len, plan(wide, 10, 1))) == [10]  # asked for: stacked anyway
    dropout = S.load_spec(write_spec(tmp_path / "d", grid, overrides='"model.dropout" = 0.1\n'))
    assert all(len(t) == 1 for t in plan(dropout.runs, 4, 1))
    resumed = Path(small[0].config.train.out_dir) / "checkpoint.pt"
    resumed.parent.mkdir(parents=True)
    resumed.write_bytes(b"")
    tasks = plan(small, 4, 1)
    assert [small[0]] in tasks and sorted(map(len, tasks)) == [1, 3, 3, 3]
