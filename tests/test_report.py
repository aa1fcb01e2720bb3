"""Tests for ``spectral_mup.report`` and ``smup report``: exact numbers on synthetic rows."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spectral_mup.cli import main
from spectral_mup.report import (
    CSV_COLUMNS,
    build_report,
    build_studies,
    cell_text,
    fit_optimum,
    markdown_table,
    pair_studies,
    tables_csv,
    transfer_summary,
    write_report,
)
from spectral_mup.report.stats import t_quantile
from spectral_mup.store import RunStore

WIDTHS = (64, 128, 256, 512)
LOG2_LRS = tuple(range(-12, -3))  # lr = 2^-12 .. 2^-4, one grid step = a factor 2
NOISE = {0: -0.01, 1: +0.01}  # seed offsets: mean exact, sample std = 0.01·√2


def row(**kw: Any) -> dict[str, Any]:
    """A store row with defaults for everything a report does not vary."""
    r = {
        "sweep": "s",
        "optimizer": "adamw",
        "param": "mup",
        "depth_alpha": 1.0,
        "width": 64,
        "depth": 2,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "seed": 0,
        "status": "ok",
        "best_val_loss": 2.0,
        "final_val_loss": None,
        "train_loss": None,
        "diverged_step": None,
        "iters": 10,
        "tokens": 100,
        "wall_time": 1.0,
        "error": None,
        "config": {},
        "finished_at": "2025-01-01T00:00:00",
    }
    r.update(kw)
    r.setdefault("id", "-".join(str(r[k]) for k in ("sweep", "optimizer", "param", "width")))
    r["id"] += f"-{r['depth']}-{r['lr']}-{r['seed']}-{r['depth_alpha']}-{r['weight_decay']}"
    return r


def loss(param: str, width: int, log2_lr: int, seed: int) -> float:
    """Parabola in log2(lr), 0.05 lower per width doubling. μP: optimum 2^-8 at every width;
    SP: optimum 2^-6 at width 64, halving with every width doubling."""
    doublings = math.log2(width / 64)
    opt = -8 if param == "mup" else -6 - doublings
    return 2.0 + 0.1 * (log2_lr - opt) ** 2 - 0.05 * doublings + NOISE[seed]


def sweep_rows(**kw: Any) -> list[dict[str, Any]]:
    return [
        row(param=p, width=w, lr=2.0**k, seed=s, best_val_loss=loss(p, w, k, s), **kw)
        for p in ("sp", "mup")
        for w in WIDTHS
        for k in LOG2_LRS
        for s in NOISE
    ]


def by_param(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {s.key.param: s for s in build_studies(rows)}


# ----------------------------------------------------------------------------- transfer


def test_mup_optimum_stands_still_sp_drifts_one_step_per_doubling() -> None:
    studies = by_param(sweep_rows())
    assert set(studies) == {"sp", "mup"}
    sp, mup = transfer_summary(studies["sp"]), transfer_summary(studies["mup"])
    assert sp.key.axis == mup.key.axis == "width" and sp.key.fixed == 2
    assert sp.grid_step == mup.grid_step == 1.0
    assert mup.best_lr == dict.fromkeys(WIDTHS, 2.0**-8)
    assert sp.best_lr == {64: 2.0**-6, 128: 2.0**-7, 256: 2.0**-8, 512: 2.0**-9}
    assert mup.drift_steps == 0.0
    assert sp.drift_steps == len(WIDTHS) - 1
    # exact parabolas: the sub-grid optimum is the grid optimum
    assert mup.fit_drift_steps == pytest.approx(0.0, abs=1e-9)
    assert sp.fit_drift_steps == pytest.approx(3.0)
    assert sp.fit_lr[128] == pytest.approx(2.0**-7)
    assert mup.transferred_lr == 2.0**-8 and sp.transferred_lr == 2.0**-6
    assert mup.best_loss[512] == pytest.approx(2.0 - 0.15)
    assert mup.best_std[512] == pytest.approx(0.01 * math.sqrt(2))
    assert mup.best_n == dict.fromkeys(WIDTHS, 2)
    # μP: at the transferred LR every wider model is better; SP: every wider one is worse
    assert mup.loss_at_transferred == pytest.approx({64: 2.0, 128: 1.95, 256: 1.9, 512: 1.85})
    assert mup.wider_better is True and mup.monotone is True
    assert sp.loss_at_transferred[512] == pytest.approx(2.0 + 0.1 * 9 - 0.15)
    assert sp.wider_better is False and sp.monotone is False
    assert not any(sp.at_edge.values()) and sp.min_seeds == 2
    # the seeds shift every cell alike: each paired test is decided (zero spread)
    assert mup.wider_better_decided is True and sp.wider_better_decided is False
    assert mup.decided == dict.fromkeys(WIDTHS, True)
    # SP's optimum at 2^-7 (width 128) is within one step of 2^-6, at 2^-8 (256) two away
    assert sp.decided == {64: True, 128: True, 256: False, 512: False}


def test_rows_from_before_a_config_key_existed_join_its_default() -> None:
    """A store that outlives a new config key: rows written before it (no key) and rows
    holding it at the value that trains them the same (a LATER_KEYS value, or unset as None)
    are one study, whichever row comes first; another value is another study."""
    old = {"model": {"width": 64}}
    new = {"model": {"width": 64, "position": "learned", "rope_theta": None}}
    other = {"model": {"width": 64, "position": "rotary", "rope_theta": None}}
    for first, second in ((old, new), (new, old)):
        rows = []
        for i, r in enumerate(sweep_rows(sweep="k")):
            rows.append(dict(r, id=f"{r['id']}-{i}", config=first if i % 2 else second))
        assert len(build_studies(rows)) == 2  # SP and μP, each one study
    rows = [dict(r, id=f"{r['id']}-{i}", config=old if i % 2 else other)
            for i, r in enumerate(sweep_rows(sweep="k"))]  # fmt: skip
    assert len(build_studies(rows)) == 4


def test_other_swept_hps_are_other_studies_paired_sp_with_mup() -> None:
    """Runs that differ in a swept config key at the same width (``param.lr_input``) are
    separate studies, labelled with it and paired SP↔μP by it; a key that only follows the
    width (a derived hidden size) is not an HP."""
    rows = []
    for lr_input in (0.5, 2.0):
        for r in sweep_rows(sweep="h"):
            r["config"] = {"param": {"lr_input": lr_input}, "model": {"hidden": 4 * r["width"]},
                           "train": {"out_dir": f"runs/{len(rows)}"}}  # fmt: skip
            r["id"] += f"-{lr_input}"
            rows.append(r)
    studies = build_studies(rows)
    assert sorted((s.key.param, s.key.hps) for s in studies) == [
        (p, (("param.lr_input", v),)) for p in ("mup", "sp") for v in (0.5, 2.0)
    ]
    assert all(len(s.cells) == len(WIDTHS) * len(LOG2_LRS) for s in studies)
    pairs = pair_studies(studies)
    assert len(pairs) == 2 and all(p.sp.key.hps == p.mup.key.hps for p in pairs)
    assert "lr_input=0.5" in pairs[0].mup.key.label()
    report = build_report(rows, "store")
    assert "| HPs |" in report.markdown and "lr_input=2" in report.markdown
    assert [c["hps"] for c in report.comparison] == [
        {"param.lr_input": 0.5},
        {"param.lr_input": 2.0},
    ]


def test_seed_noise_compares_the_gap_to_the_better_neighbour_with_its_standard_error() -> None:
    """Per size: the gap from the argmin to the better neighbouring LR and the standard
    error of that gap from both cells' seeds; the report names the sizes where it is
    under 2 SE (the argmin is not decided by these seeds)."""
    # width 64: neighbours 0.1 worse, seeds ±0.01 -> se = sqrt(2 · 0.0002 / 2) = 0.01414
    # width 128: the right neighbour only 0.005 worse -> within noise
    # width 256: one seed per cell -> no estimate
    rows = []
    for k, (a, b) in {-9: (2.1, 2.1), -8: (2.0, 2.0), -7: (2.1, 2.005)}.items():
        for width, extra in ((64, a), (128, b)):
            rows += [row(width=width, lr=2.0**k, seed=s, best_val_loss=extra + o)
                     for s, o in NOISE.items()]  # fmt: skip
        rows.append(row(width=256, lr=2.0**k, seed=0, best_val_loss=a))
    (study,) = build_studies(rows)
    t = transfer_summary(study)
    se = math.sqrt(2 * (0.01 * math.sqrt(2)) ** 2 / 2)
    # each seed moves every LR alike here, so the per-seed gaps agree: paired SE 0
    assert t.noise[64] == pytest.approx((0.1, se, 0.0))
    assert t.noise[128] == pytest.approx((0.005, se, 0.0))
    assert t.noise[256] is None
    assert t.within_noise() == [128]
    assert t.within_noise(paired=True) == []
    text = build_report(rows, "store").markdown
    assert "the argmin is within 2 SE of a neighbour at width 128:" in text
    assert "paired, 2 of 2 are 2 SE clear" in text
    want = {"gap": 0.1, "se": se, "paired_se": 0.0}
    assert t.to_json()["noise"]["64"] == pytest.approx(want)


def test_cells_with_more_seeds_near_the_optimum_are_compared_on_shared_seeds() -> None:
    """``smup sweep --near-best 1 --only seed=1``: seed 1 only at the three LRs around seed
    0's optimum. Seed 1 sits 0.05 above seed 0 there (as measured in the Llama AdamW sweep,
    width 16, whose seed-0 losses these are), so a plain seed-mean would crown 2^-6, which
    has seed 0 only. Compared on shared seeds: seed 0 picks the window, both seeds the LR in
    it; the fit and the noise use the seeds the cells share."""
    seed0 = {-9: 2.2481, -8: 2.2256, -7: 2.2359, -6: 2.2396, -5: 2.4331}
    seed1 = {-9: 2.3017, -8: 2.2900, -7: 2.2855}
    rows = [row(lr=2.0**k, seed=0, best_val_loss=v) for k, v in seed0.items()]
    rows += [row(lr=2.0**k, seed=1, best_val_loss=v) for k, v in seed1.items()]
    (study,) = build_studies(rows)
    assert study.cell(2.0**-6, 64).mean < study.cell(2.0**-8, 64).mean  # the plain trap
    t = transfer_summary(study)
    assert t.best_lr == {64: 2.0**-8}
    assert t.best_loss[64] == pytest.approx((2.2256 + 2.2900) / 2)
    means = {k: (seed0[k] + seed1[k]) / 2 for k in (-9, -8, -7)}
    want = [(2.0**k, means[k]) for k in (-9, -8, -7)]
    assert t.fit_lr[64] == pytest.approx(fit_optimum(want, 2.0**-8))
    gap = means[-7] - means[-8]  # the better neighbour on both seeds
    a, b = [seed0[-8], seed1[-8]], [seed0[-7], seed1[-7]]
    se = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    paired = abs((b[0] - a[0]) - (b[1] - a[1])) / 2  # std of 2 gaps / sqrt(2)
    assert t.noise[64] == pytest.approx((gap, se, paired))
    assert {lr for lr in study.lrs if study.is_best(lr, 64)} == {2.0**-8}
    # a second seed at one LR the first seed does not favour does not make it the best
    rows = [row(lr=2.0**k, seed=0, best_val_loss=v) for k, v in seed0.items()]
    rows.append(row(lr=2.0**-5, seed=1, best_val_loss=1.0))
    (study,) = build_studies(rows)
    assert study.best_lr(64) == 2.0**-8
    # no seed in every cell: the cells' own means
    rows = [row(lr=2.0**-8, seed=0, best_val_loss=2.1), row(lr=2.0**-7, seed=1, best_val_loss=2.0)]
    assert build_studies(rows)[0].best_lr(64) == 2.0**-7


def test_wider_better_without_monotone() -> None:
    # at the transferred LR (2^-8): 2.0, 2.1, 1.9 → widest beats narrowest, not monotone
    rows = [
        row(width=w, lr=2.0**k, best_val_loss=v + 0.1 * abs(k + 8))
        for w, v in ((64, 2.0), (128, 2.1), (256, 1.9))
        for k in (-9, -8, -7)
    ]
    (study,) = build_studies(rows)
    t = transfer_summary(study)
    assert t.loss_at_transferred == pytest.approx({64: 2.0, 128: 2.1, 256: 1.9})
    assert t.wider_better is True
    assert t.monotone is False


def test_t_quantile_matches_the_textbook_table() -> None:
    """One-sided Student-t quantiles from a printed table (df 1, 2, 10 at 95%; df 30 at
    97.5%), to the table's 3 decimals."""
    for p, df, want in ((0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 10, 1.812), (0.975, 30, 2.042)):
        assert t_quantile(p, df) == pytest.approx(want, abs=6e-4)


def test_transfer_decided_by_a_paired_t_test_against_the_lrs_two_steps_away() -> None:
    """Transferred LR 2^-8 (best at width 64). Per width: the best of 2^-9 … 2^-7 against
    2^-10 and 2^-6, one-sided 95% paired t on 3 seeds (t = 2.920, df 2, from the table)."""
    cols = {
        # 2^-10 gaps 0.10/0.12/0.11: mean 0.11, SE 0.01/√3, bound 0.0169 -> beaten; 2^-6
        # gaps 0.02/0.00/0.04: mean 0.02 < 2.920 · 0.02/√3 = 0.0337 -> undecided
        64: {-10: [2.10, 2.13, 2.13], -9: [2.05] * 3, -8: [2.00, 2.01, 2.02],
             -7: [2.04] * 3, -6: [2.02, 2.01, 2.06]},
        # best near LR 2^-7; 2^-10 0.3 worse on every seed, 2^-6 by 0.05/0.03/0.04: mean
        # 0.04 > 2.920 · 0.01/√3 = 0.0169 -> yes
        128: {-10: [2.3, 2.31, 2.32], -9: [2.2] * 3, -8: [2.1] * 3, -7: [2.0, 2.01, 2.02],
              -6: [2.05, 2.04, 2.06]},
        # 2^-6 beats the best near LR (2^-7) by 0.1 on every seed -> no
        256: {-10: [2.5] * 3, -9: [2.4] * 3, -8: [2.3] * 3, -7: [2.2, 2.21, 2.22],
              -6: [2.1, 2.11, 2.13]},
        # 2^-10 diverged: beaten; 2^-6 0.3 worse -> yes
        512: {-10: "div", -9: [2.1] * 3, -8: [2.0, 2.01, 2.02], -7: [2.1] * 3,
              -6: [2.3, 2.32, 2.31]},
        # 2^-6 never run -> undecided
        1024: {-10: [2.3] * 3, -9: [2.1] * 3, -8: [2.0] * 3, -7: [2.1] * 3},
    }  # fmt: skip
    rows = []
    for width, col in cols.items():
        for k, losses in col.items():
            for s in range(3):
                if losses == "div":
                    r = row(width=width, lr=2.0**k, seed=s, status="diverged",
                            best_val_loss=None, diverged_step=3)  # fmt: skip
                else:
                    r = row(width=width, lr=2.0**k, seed=s, best_val_loss=losses[s])
                rows.append(r)
    (study,) = build_studies(rows)
    t = transfer_summary(study)
    assert t.transferred_lr == 2.0**-8
    assert t.decided == {64: None, 128: True, 256: False, 512: True, 1024: None}
    # width 1024 vs 64 at 2^-8: gaps 0.00/0.01/0.02, mean 0.01 < 0.0169: lower, undecided
    assert t.wider_better is True and t.wider_better_decided is None
    assert t.to_json()["decided_within_one_step"] == {
        "64": None, "128": True, "256": False, "512": True, "1024": None
    }  # fmt: skip
    text = build_report(rows, "store").markdown
    assert (
        "t-test on shared seeds): 64: undecided, 128: yes, 256: no, 512: yes, 1024: undecided"
        in text
    )
    # seeds 0 and 1 only: 2^-6's gaps 0.05, 0.03 (mean 0.04, SE 0.01) pass 2 SE but not
    # the t bound of one degree of freedom, 6.314 SE
    two = [r for r in rows if r["seed"] < 2 and r["width"] in (64, 128)]
    (study,) = build_studies(two)
    t = transfer_summary(study)
    assert t.transferred_lr == 2.0**-8
    assert t.decided[128] is None


def test_fit_optimum_recovers_an_off_grid_vertex() -> None:
    vertex = -7.3
    column = [(2.0**k, 2.0 + 0.2 * (k - vertex) ** 2) for k in range(-10, -4)]
    assert math.log2(fit_optimum(column, 2.0**-7)) == pytest.approx(vertex)
    assert fit_optimum(column, 2.0**-10) == 2.0**-10  # grid edge: the argmin itself
    column[3] = (2.0**-7, math.inf)  # a diverged neighbour of the argmin 2^-8
    assert fit_optimum(column, 2.0**-8) == 2.0**-8


def test_grid_step_is_the_finest_spacing_and_edge_is_flagged() -> None:
    lrs = (2e-1, 5e-2, 2e-2, 2e-3)  # the seed paper's Table 7 grid (top rows)
    rows = [
        row(width=w, lr=lr, best_val_loss=2.0 + (i if w == 64 else 3 - i) * 0.1)
        for w in (64, 128)
        for i, lr in enumerate(lrs)
    ]
    (study,) = build_studies(rows)
    t = transfer_summary(study)
    assert t.grid_step == pytest.approx(math.log2(5e-2 / 2e-2))
    assert t.best_lr == {64: 2e-1, 128: 2e-3}
    assert t.drift_steps == pytest.approx(math.log2(100) / math.log2(2.5))
    assert t.at_edge == {64: True, 128: True}


# ----------------------------------------------------------------------------- cells


def test_cell_mean_and_sample_std_are_exact() -> None:
    rows = [row(seed=s, best_val_loss=v) for s, v in enumerate((2.0, 2.1, 2.5))]
    rows.append(row(lr=2e-3, seed=0, best_val_loss=3.0))
    rows += [row(lr=2e-3, seed=s, status="failed", best_val_loss=None) for s in (1, 2)]
    (study,) = build_studies(rows)
    cell = study.cell(1e-3, 64)
    assert cell.mean == pytest.approx(6.6 / 3)
    assert cell.std == pytest.approx(math.sqrt(((2.0 - 2.2) ** 2 + 0.1**2 + 0.3**2) / 2))
    assert cell_text(study, 1e-3, 64) == f"{6.6 / 3:.4f} ± {cell.std:.4f}"
    # failed seeds are left out of the mean; the cell shows its seed count
    assert study.cell(2e-3, 64).mean == 3.0 and math.isnan(study.cell(2e-3, 64).std)
    assert cell_text(study, 2e-3, 64) == "3.0000 (n=1)"


def test_best_per_column_is_bold_and_flagged() -> None:
    sp = by_param(sweep_rows())["sp"]
    table = markdown_table(sp).splitlines()
    assert table[0] == "| LR / width | 64 | 128 | 256 | 512 |"
    assert sp.lrs == [2.0**k for k in reversed(LOG2_LRS)]  # rows descending, as in the paper
    bold = {
        (lr, w)
        for lr, line in zip(sp.lrs, table[2:], strict=True)
        for w, text in zip(WIDTHS, line.split("|")[2:-1], strict=True)
        if text.strip().startswith("**")
    }
    assert bold == {(2.0**-6, 64), (2.0**-7, 128), (2.0**-8, 256), (2.0**-9, 512)}
    assert bold == {(lr, w) for lr in sp.lrs for w in sp.sizes if sp.is_best(lr, w)}
    best_64 = table[2 + sp.lrs.index(2.0**-6)].split("|")[2].strip()
    assert best_64 == f"**2.0000 ± {0.01 * math.sqrt(2):.4f}**"


def test_a_diverged_seed_makes_the_cell_diverged() -> None:
    rows = [r for r in sweep_rows() if r["param"] == "mup"]
    for r in rows:  # at width 128 one seed of the best LR diverges
        if r["width"] == 128 and r["lr"] == 2.0**-8 and r["seed"] == 1:
            r.update(status="diverged", best_val_loss=2.7, diverged_step=5)
    rows += [
        row(width=w, lr=2.0**-3, seed=s, status="diverged", best_val_loss=None)
        for w in WIDTHS
        for s in NOISE
    ]
    rows += [row(width=64, lr=2.0**-2, seed=s, status="failed", error="boom") for s in NOISE]
    rows.append(row(width=256, lr=2.0**-2, seed=0, best_val_loss=math.nan))  # NaN loss = div
    (study,) = build_studies(rows)
    assert cell_text(study, 2.0**-8, 128) == "div 1/2"
    assert cell_text(study, 2.0**-3, 512) == "div"
    assert cell_text(study, 2.0**-2, 64) == "fail"
    assert cell_text(study, 2.0**-2, 256) == "div"
    assert cell_text(study, 2.0**-2, 128) == "—"
    t = transfer_summary(study)
    # the diverged cell never wins: width 128's best moves to a neighbour (tie: smaller LR)
    assert t.best_lr == {64: 2.0**-8, 128: 2.0**-9, 256: 2.0**-8, 512: 2.0**-8}
    assert t.drift_steps == 1.0
    assert t.loss_at_transferred[128] == math.inf
    assert t.wider_better is True and t.monotone is False
    assert t.at_edge == dict.fromkeys(WIDTHS, False)
    assert study.lrs[:2] == [0.25, 0.125]


# ----------------------------------------------------------------------------- grouping


def test_width_and_depth_grid_gives_one_study_per_fixed_value() -> None:
    rows = [
        row(width=w, depth=d, lr=lr, best_val_loss=2.0 + lr)
        for w in (64, 128)
        for d in (2, 4, 8)
        for lr in (1e-3, 2e-3)
    ]
    rows.append(row(width=256, depth=16, best_val_loss=2.0))  # in no sweep: a 1-column study
    keys = sorted((s.key.axis, s.key.fixed, tuple(s.sizes)) for s in build_studies(rows))
    assert keys == [
        ("depth", 64, (2, 4, 8)),
        ("depth", 128, (2, 4, 8)),
        ("width", 2, (64, 128)),
        ("width", 4, (64, 128)),
        ("width", 8, (64, 128)),
        ("width", 16, (256,)),
    ]
    depth_only = [row(depth=d, best_val_loss=2.0) for d in (2, 4)]
    (study,) = build_studies(depth_only)
    assert (study.key.axis, study.key.fixed, study.sizes) == ("depth", 64, [2, 4])
    assert transfer_summary(study).wider_better is False  # equal losses: not better


def test_sp_pairs_with_every_alpha_of_mup() -> None:
    rows = [row(param="sp", depth_alpha=None)]
    rows += [row(param="mup", depth_alpha=a) for a in (0.0, 1.0)]
    rows += [row(optimizer="lion", param="sp", weight_decay=0.1)]
    pairs = pair_studies(build_studies(rows))
    got = sorted(
        (p.key.optimizer, p.sp is not None, p.mup.key.depth_alpha if p.mup else None) for p in pairs
    )
    assert got == [("adamw", True, 0.0), ("adamw", True, 1.0), ("lion", True, None)]


def test_two_architectures_in_one_sweep_are_never_one_study() -> None:
    """Runs that differ only in model.arch (read from each row's config) are two studies,
    labelled by architecture, paired within their architecture, and named apart."""
    rows = sweep_rows() + [
        dict(r, id=r["id"] + "-llama", config={"model": {"arch": "llama"}}) for r in sweep_rows()
    ]
    studies = build_studies(rows)
    assert sorted((s.key.arch, s.key.param) for s in studies) == [
        ("gpt", "mup"),
        ("gpt", "sp"),
        ("llama", "mup"),
        ("llama", "sp"),
    ]
    assert all(len(s.cell(2.0**-8, 64).losses) == 2 for s in studies)  # 2 seeds, not 4
    pairs = pair_studies(studies)
    assert sorted((p.sp.key.arch, p.mup.key.arch) for p in pairs) == [
        ("gpt", "gpt"),
        ("llama", "llama"),
    ]
    labels = sorted(p.key.label(param=False) for p in pairs)
    assert labels[0].startswith("s: adamw") and labels[1].startswith("s: llama adamw")
    md = build_report(rows, "store").markdown
    assert "| model | optimizer |" in md and "| llama | adamw |" in md
    assert {r["arch"] for r in csv.DictReader(io.StringIO(tables_csv(studies)))} == {
        "gpt",
        "llama",
    }


# ----------------------------------------------------------------------------- files


def test_csv_parses_back_to_the_cells() -> None:
    rows = sweep_rows()
    rows.append(row(param="sp", width=512, lr=2.0**-3, status="diverged", best_val_loss=None))
    studies = build_studies(rows)
    lines = list(csv.DictReader(io.StringIO(tables_csv(studies))))
    assert tuple(lines[0]) == CSV_COLUMNS
    assert len(lines) == sum(len(s.cells) for s in studies) == 2 * 4 * 9 + 1
    index = {s.key.param: s for s in studies}
    for line in lines:
        study = index[line["param"]]
        cell = study.cell(float(line["lr"]), int(line["width"]))
        assert int(line["depth"]) == 2 and line["axis"] == "width"
        assert line["status"] == cell.status
        assert int(line["n_seeds"]) == cell.n_seeds
        assert int(line["best_in_column"]) == study.is_best(cell.lr, cell.size)
        if cell.status == "ok":
            assert float(line["mean_best_val_loss"]) == cell.mean
            assert float(line["std_best_val_loss"]) == cell.std
            assert float(line["min_best_val_loss"]) == min(cell.losses)
        else:
            assert line["mean_best_val_loss"] == "" and line["n_diverged"] == "1"
    assert sum(int(line["best_in_column"]) for line in lines) == 8


def test_write_report_files(tmp_path: Path) -> None:
    rows = sweep_rows() + sweep_rows(optimizer="lion")
    report = build_report(rows, "synthetic")
    paths = write_report(report, tmp_path / "rep", "synthetic")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["report.md", "tables.csv", "summary.json", "lr_adamw_width.png", "lr_lion_width.png"]
    )
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == names  # no temp files
    for png in ("lr_adamw_width.png", "lr_lion_width.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert [(c["optimizer"], c["drift_sp"], c["drift_mup"]) for c in summary["comparison"]] == [
        ("adamw", 3.0, 0.0),
        ("lion", 3.0, 0.0),
    ]
    assert [c["wider_better_mup"] for c in summary["comparison"]] == [True, True]
    study = summary["studies"][1]
    assert (study["optimizer"], study["param"]) == ("adamw", "mup")
    assert study["best_lr"] == {str(w): 2.0**-8 for w in WIDTHS}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| adamw | width (depth 2) | 1 | 0 | 3 | 0 | 3.00 | 0.00 | no | yes |" in md
    assert "![adamw val loss vs LR](lr_adamw_width.png)" in md
    assert md.count("### μP") == 2 and md.count("### SP") == 2


# ----------------------------------------------------------------------------- CLI


def fail(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path) -> str:
    code = main([*argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smup: error: "), captured.err
    assert captured.out == ""
    assert not out.exists()
    return lines[0]


def test_cli_missing_store(capsys, tmp_path) -> None:
    msg = fail(capsys, ["report", str(tmp_path / "nope.db")], tmp_path / "out")
    assert "no run store at" in msg and "smup sweep" in msg
    assert not (tmp_path / "nope.db").exists()


def test_cli_directory_instead_of_store(capsys, tmp_path) -> None:
    msg = fail(capsys, ["report", str(tmp_path)], tmp_path / "out")
    assert "is a directory" in msg


def test_cli_empty_store(capsys, tmp_path) -> None:
    RunStore(tmp_path / "runs.db").close()
    msg = fail(capsys, ["report", str(tmp_path / "runs.db")], tmp_path / "out")
    assert "has no runs" in msg and "smup sweep" in msg
    assert not (tmp_path / "runs_report").exists()


def test_cli_only_failed_runs(capsys, tmp_path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        for seed in (0, 1):
            error = "Traceback (most recent call last):\n  ...\nValueError: bad width"
            store.add(row(seed=seed, status="failed", best_val_loss=None, error=error))
    msg = fail(capsys, ["report", str(tmp_path / "runs.db")], tmp_path / "out")
    assert "all 2 runs" in msg and "ValueError: bad width" in msg and "rerun the sweep" in msg


def test_cli_unknown_sweep(capsys, tmp_path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        store.add(row())
    argv = ["report", str(tmp_path / "runs.db"), "--sweep", "other"]
    msg = fail(capsys, argv, tmp_path / "out")
    assert "no runs of sweep 'other'" in msg and "sweeps in it: s" in msg


def test_cli_store_round_trip(capsys, tmp_path) -> None:
    store_path = tmp_path / "sweep" / "runs.db"
    with RunStore(store_path) as store:
        assert store.add_many(sweep_rows()) == 2 * 4 * 9 * 2
        store.add(row(sweep="t", param="mup", lr=0.5, seed=0, best_val_loss=3.0))
    assert main(["report", str(store_path), "--sweep", "s"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    head = "optimizer axis α wd drift SP drift μP fit drift SP fit drift μP"
    assert lines[0].split() == (head + " wider better SP wider better μP").split()
    assert " ".join(lines[1].split()) == "adamw width (depth 2) 1 0 3 0 3.00 0.00 no yes"
    out = store_path.parent / "runs_report"
    assert lines[2:] == [
        f"wrote {out / name}"
        for name in ("report.md", "tables.csv", "summary.json", "lr_adamw_width.png")
    ]
    summary = json.loads((out / "summary.json").read_text())
    mup = next(s for s in summary["studies"] if s["param"] == "mup")
    assert mup["drift_steps"] == 0.0 and mup["transferred_lr"] == 2.0**-8
    assert mup["best_std"]["64"] == pytest.approx(0.01 * np.sqrt(2))
    assert mup["loss_at_transferred"]["512"] == pytest.approx(1.85)
