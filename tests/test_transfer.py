"""`smup transfer`: proxy sweep → best LR → target runs, all through the run store."""

from __future__ import annotations

import json
import statistics

import pytest

from spectral_mup.cli import main
from spectral_mup.store import RunStore
from test_sweep import write_spec

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = """\
optimizer = "adamw"
param = ["sp", "mup"]
width = 16
depth = 1
lr = [0.001, 0.01, 0.1]
seed = [0, 1]
"""


def test_transfer_trains_the_target_at_the_proxy_optimum(tmp_path, capsys):
    spec = write_spec(tmp_path, GRID, budget="steps = 12", sweep="workers = 1")
    code = main(["transfer", str(spec), "--target-width", "32", "--target-depth", "2", "--sp"])
    out = capsys.readouterr().out
    assert code == 0, out
    with RunStore(tmp_path / "store.sqlite", create=False) as store:
        rows = store.rows()
    proxy = [r for r in rows if r["sweep"] == "t"]
    target = [r for r in rows if r["sweep"] == "t-transfer"]
    assert len(proxy) == 12 and len(target) == 4  # 2 params × 2 seeds at the target
    info = json.loads((tmp_path / "transfer_32x2.json").read_text())
    assert info["proxy"] == {"width": 16, "depth": 1}
    for arm in info["arms"]:
        means = {
            lr: statistics.fmean(
                r["best_val_loss"] for r in proxy if r["param"] == arm["param"] and r["lr"] == lr
            )
            for lr in (0.001, 0.01, 0.1)
        }
        assert arm["lr"] == min(means, key=means.get)  # the proxy's seed-mean argmin
        assert arm["proxy_loss"] == pytest.approx(means[arm["lr"]])
        mine = [r for r in target if r["param"] == arm["param"]]
        assert {(r["width"], r["depth"], r["lr"]) for r in mine} == {(32, 2, arm["lr"])}
        assert arm["target_loss"] == pytest.approx(
            statistics.fmean(r["best_val_loss"] for r in mine)
        )
    assert "μP" in out and "SP" in out and "target width 32 depth 2" in out
    # rerun: everything is stored, nothing retrains, same numbers
    assert main(["transfer", str(spec), "--target-width", "32", "--target-depth", "2", "--sp"]) == 0
    assert json.loads((tmp_path / "transfer_32x2.json").read_text()) == info


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-width", "33"], "divisible"),
        (["--target-width", "32", "--proxy-width", "64"], "--proxy-width 64 is not in"),
    ],
)
def test_transfer_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, args, message):
    spec = write_spec(tmp_path, GRID, budget="steps = 12")
    assert main(["transfer", str(spec), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "store.sqlite").exists()


def test_joint_width_and_depth_transfer_keeps_each_model_apart(tmp_path, capsys):
    """Proxy (width 16, depth 1) → target (32, 2) for the GPT and the Llama in one spec:
    each arm takes its own model's proxy optimum and trains its own model."""
    grid = GRID.replace('optimizer = "adamw"', 'arch = ["gpt", "llama"]\noptimizer = "adamw"')
    grid = grid.replace("seed = [0, 1]", "seed = [0]")
    spec = write_spec(tmp_path, grid, budget="steps = 8", sweep="workers = 1")
    assert main(["transfer", str(spec), "--target-width", "32", "--target-depth", "2", "--sp"]) == 0
    out = capsys.readouterr().out
    with RunStore(tmp_path / "store.sqlite", create=False) as store:
        rows = store.rows()
    info = json.loads((tmp_path / "transfer_32x2.json").read_text())
    assert sorted((a["arch"], a["param"]) for a in info["arms"]) == [
        ("gpt", "mup"),
        ("gpt", "sp"),
        ("llama", "mup"),
        ("llama", "sp"),
    ]
    for arm in info["arms"]:
        proxy = {
            r["lr"]: r["best_val_loss"]
            for r in rows
            if r["sweep"] == "t"
            and r["param"] == arm["param"]
            and r["config"]["model"]["arch"] == arm["arch"]
        }
        assert arm["lr"] == min(proxy, key=proxy.get)
        (target,) = [
            r
            for r in rows
            if r["sweep"] == "t-transfer"
            and r["param"] == arm["param"]
            and r["config"]["model"]["arch"] == arm["arch"]
        ]
        assert (target["width"], target["depth"], target["lr"]) == (32, 2, arm["lr"])
        assert arm["target_loss"] == pytest.approx(target["best_val_loss"])
    assert "| model |" in out and "| llama |" in out


def test_tuned_transfer_picks_the_best_candidate_and_counts_compute(tmp_path, capsys):
    """--tune: the μP winner is the proxy candidate (LR × a searched HP) with the lowest
    seed-mean, trained at the target; SP is tuned at the target over the same candidates;
    each side's tuning FLOPs are Σ tokens × (6N + 12·L·T·d) of its tuning runs."""
    from spectral_mup import Parametrization
    from spectral_mup.models import GPT, GPTConfig

    grid = 'optimizer = "adamw"\nparam = ["sp", "mup"]\nwidth = 16\ndepth = 1\n'
    grid += 'lr = [0.003, 0.03]\nseed = [0, 1]\n"param.lr_input" = [0.25, 4.0]'
    spec = write_spec(tmp_path, grid, budget="steps = 12", sweep="workers = 1")
    argv = ["transfer", str(spec), "--target-width", "32", "--tune", "--sp"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    with RunStore(tmp_path / "store.sqlite", create=False) as store:
        rows = store.rows()
    info = json.loads((tmp_path / "tuned_transfer_t_32x1.json").read_text())
    mup, sp = info["sides"]
    assert (mup["param"], sp["param"]) == ("mup", "sp")
    assert mup["trials"] == sp["trials"] == 4 and mup["tuned_at"] == [16, 1]
    assert sp["tuned_at"] == [32, 1]

    def means(sweep, param, width):
        cells = {}
        for r in rows:
            if (r["sweep"], r["param"], r["width"]) == (sweep, param, width):
                key = (r["lr"], r["config"]["param"]["lr_input"])
                cells.setdefault(key, []).append(r["best_val_loss"])
        return {k: statistics.fmean(v) for k, v in cells.items()}

    proxy = means("t", "mup", 16)
    best = min(proxy, key=proxy.get)
    assert (mup["hps"]["optim.lr"], mup["hps"]["param.lr_input"]) == best
    assert set(mup["hps"]) == {"optim.lr", "param.lr_input"}
    assert mup["tuned_loss"] == pytest.approx(proxy[best])
    at_target = means("t-sp-at-target", "sp", 32)
    sp_best = min(at_target, key=at_target.get)
    assert (sp["hps"]["optim.lr"], sp["hps"]["param.lr_input"]) == sp_best
    assert sp["target_loss"] == pytest.approx(at_target[sp_best])
    targets = [r for r in rows if r["sweep"] == "t-transfer"]
    assert len(targets) == 2 and {r["config"]["param"]["lr_input"] for r in targets} == {best[1]}
    assert mup["target_loss"] == pytest.approx(
        statistics.fmean(r["best_val_loss"] for r in targets)
    )

    # the FLOPs formula, counted here by hand on the model itself
    model = GPT(GPTConfig(width=16, depth=1, n_heads=2, vocab_size=65, block_size=16),
                Parametrization(kind="sp"))  # fmt: skip
    n = sum(
        q.numel()
        for name, q in model.named_parameters()
        if name not in ("wte.weight", "wpe.weight")
    )
    per_token = 6 * n + 12 * 1 * 16 * 16
    tokens = sum(r["tokens"] for r in rows if r["sweep"] == "t" and r["param"] == "mup")
    assert mup["tuning_flops"] == pytest.approx(tokens * per_token)
    assert mup["tuning_seconds"] == pytest.approx(
        sum(r["wall_time"] for r in rows if r["sweep"] == "t" and r["param"] == "mup")
    )
    assert sp["final_flops"] == 0 and mup["final_flops"] > 0
    assert "tuning PFLOP" in out and "lr_input=" in out


def test_tuned_transfer_with_an_sp_spec_tunes_sp_over_its_own_candidates(tmp_path, capsys):
    """--sp-spec: μP searches several HPs on the proxy while SP's candidates are another
    spec's SP runs (an LR grid here), resized to the target; the μP spec needs no SP runs.
    Without --sp, or with a spec of several sizes or no SP runs, it is a one-line error."""
    mup_grid = 'optimizer = "adamw"\nparam = "mup"\nwidth = 16\ndepth = 1\nseed = [0, 1]\n'
    search = '\n[search]\ntrials = 3\n"optim.lr" = { log2_min = -9, log2_max = -4 }\n'
    search += '"param.init_output" = { min = 0.5, max = 2.0 }\n'
    mup_spec = write_spec(tmp_path / "mup", mup_grid + search, budget="steps = 10",
                          sweep="workers = 1")  # fmt: skip
    sp_grid = 'optimizer = "adamw"\nparam = "sp"\nwidth = 24\ndepth = 1\nseed = [0, 1]\n'
    sp_spec = write_spec(tmp_path / "sp", sp_grid + "lr = [0.003, 0.03]", budget="steps = 10",
                         sweep="workers = 1")  # fmt: skip
    argv = ["transfer", str(mup_spec), "--target-width", "32", "--tune", "--sp"]
    assert main([*argv, "--sp-spec", str(sp_spec)]) == 0
    capsys.readouterr()
    info = json.loads((tmp_path / "mup" / "tuned_transfer_t_32x1.json").read_text())
    mup, sp = info["sides"]
    assert (mup["param"], mup["trials"], mup["tuned_at"]) == ("mup", 3, [16, 1])
    assert set(mup["hps"]) == {"optim.lr", "param.init_output"}
    assert (sp["param"], sp["trials"], sp["tuned_at"]) == ("sp", 2, [32, 1])
    assert set(sp["hps"]) == {"optim.lr"}
    with RunStore(tmp_path / "sp" / "store.sqlite", create=False) as store:
        rows = [r for r in store.rows() if r["sweep"] == "t-sp-at-target"]
    assert len(rows) == 4 and {r["width"] for r in rows} == {32}
    cells: dict[float, list[float]] = {}
    for r in rows:
        cells.setdefault(r["lr"], []).append(r["best_val_loss"])
    best = min(cells, key=lambda lr: statistics.fmean(cells[lr]))
    assert sp["hps"]["optim.lr"] == best
    assert sp["target_loss"] == pytest.approx(statistics.fmean(cells[best]))

    two_sizes = write_spec(tmp_path / "two", sp_grid.replace("24", "[24, 48]") + "lr = 0.01")
    for extra, message in [
        (["--sp-spec", str(sp_spec)], "pass --sp with it"),
        (["--sp", "--sp-spec", str(two_sizes)], "sweeps several sizes"),
        (["--sp", "--sp-spec", str(mup_spec)], "has no SP runs"),
    ]:
        base = [a for a in argv if a != "--sp"]
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["transfer", str(mup_spec), "--target-width", "32", "--sp-spec", "x"]) == 2
    assert "--sp-spec goes with --tune --sp" in capsys.readouterr().err


def test_tuned_transfer_reranks_the_best_candidates_and_pairs_fresh_seeds(tmp_path, capsys):
    """--rerank K --rerank-seeds S: each side's K best candidates (seed-mean of the spec's
    seeds) train again with S seeds after the spec's; the winner is the best of those K over
    all their seeds. --refine-lr 1: then that winner at LR ×½ and ×2 on all its seeds, the
    best of the three wins. --eval-seeds N: both winners are measured at the target on N
    seeds after those, and the printed gap pairs the two sides seed by seed."""
    grid = 'optimizer = "adamw"\nparam = ["sp", "mup"]\nwidth = 16\ndepth = 1\n'
    grid += 'lr = [0.003, 0.03]\nseed = [0, 1]\n"param.lr_input" = [0.25, 4.0]'
    spec = write_spec(tmp_path, grid, budget="steps = 10", sweep="workers = 1")
    argv = ["transfer", str(spec), "--target-width", "32", "--tune", "--sp"]
    flags = ["--rerank", "2", "--rerank-seeds", "1", "--refine-lr", "1", "--eval-seeds", "2"]
    assert main([*argv, *flags]) == 0
    out = capsys.readouterr().out
    with RunStore(tmp_path / "store.sqlite", create=False) as store:
        rows = store.rows()
    info = json.loads((tmp_path / "tuned_transfer_t_32x1_rerank2x1_lr1_eval2.json").read_text())
    assert info["rerank"] == {"top": 2, "seeds": [2]} and info["eval_seeds"] == [3, 4]
    assert info["refine_lr"] == 1
    mup, sp = info["sides"]

    def cells(sweeps, param):
        out: dict[tuple, dict[int, float]] = {}
        for r in rows:
            if r["sweep"] in sweeps and r["param"] == param:
                key = (r["lr"], r["config"]["param"]["lr_input"])
                out.setdefault(key, {})[r["seed"]] = r["best_val_loss"]
        return out

    for side, tune, rerank, line, evals in [
        (mup, "t", "t-rerank", "t-lr", "t-transfer"),
        (sp, "t-sp-at-target", "t-sp-rerank", "t-sp-lr", "t-sp-eval"),
    ]:
        first = cells({tune}, side["param"])
        assert all(set(v) == {0, 1} for v in first.values()) and len(first) == 4
        top2 = sorted(first, key=lambda k: statistics.fmean(first[k].values()))[:2]
        again = cells({rerank}, side["param"])
        assert sorted(again) == sorted(top2) and all(set(v) == {2} for v in again.values())
        full = {k: statistics.fmean([*first[k].values(), *again[k].values()]) for k in top2}
        reranked = min(full, key=full.get)
        lrs = cells({line}, side["param"])  # ×½ and ×2, the reranked winner's seeds
        assert sorted(k[0] / reranked[0] for k in lrs) == pytest.approx([0.5, 2.0])
        assert {k[1] for k in lrs} == {reranked[1]}
        assert all(set(v) == {0, 1, 2} for v in lrs.values())
        full |= {k: statistics.fmean(v.values()) for k, v in lrs.items()}
        best = min([reranked, *lrs], key=full.get)
        assert (side["hps"]["optim.lr"], side["hps"]["param.lr_input"]) == best
        assert side["tuned_loss"] == pytest.approx(full[best])
        measured = cells({evals}, side["param"])
        assert list(measured) == [best] and side["target_seeds"] == [3, 4]
        assert side["target_losses"] == pytest.approx([measured[best][3], measured[best][4]])
        assert side["trials"] == 4
        mine = [r for r in rows if r["param"] == side["param"]]
        tuning = [r for r in mine if r["sweep"] in (tune, rerank, line)]
        assert len(tuning) == 16  # 4 candidates × 2 seeds + 2 reranked × 1 seed + 2 LRs × 3
        assert side["tuning_seconds"] == pytest.approx(sum(r["wall_time"] for r in tuning))
        finals = [r for r in mine if r["sweep"] == evals]
        assert side["final_seconds"] == pytest.approx(sum(r["wall_time"] for r in finals))
    gap = [a - b for a, b in zip(sp["target_losses"], mup["target_losses"], strict=True)]
    (paired,) = info["paired"]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(statistics.fmean(gap))
    assert paired["se"] == pytest.approx(statistics.stdev(gap) / 2**0.5)
    assert "paired by seed" in out and "2 seeds" in out

    for extra, message in [
        (["--rerank-seeds", "0", "--rerank", "1"], "--rerank-seeds ≥ 1"),
        (["--eval-seeds", "-1"], "counts ≥ 0"),
        (["--refine-lr", "-1"], "counts ≥ 0"),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["transfer", str(spec), "--target-width", "32", "--rerank", "2"]) == 2
    assert "go with --tune" in capsys.readouterr().err
