"""Spread of the coordinate-check slopes that tests/test_coord.py bounds.

A bound on a measured slope must hold on another CPU, with 1 or 2 threads, alone or inside
the whole suite. Float rounding differs between CPUs and thread counts; a different seed set
perturbs the run far more than rounding does, so the spread over seed sets (each as large as
the test's) and thread counts is the margin a bound must clear. For every check of
test_coord.py this prints, per row and layer group, the slope of the test's own seed set and
the min…max over all (seed set, threads) runs. Results are cached (one JSON line per run) in
``--out``, so an interrupted run resumes.

    SMUP_DATA_DIR=../shared/data python benchmarks/coord_spread.py                 # all
    SMUP_DATA_DIR=../shared/data python benchmarks/coord_spread.py --only adamw,lamb

The Llama checks (``llama-*``: every optimizer at widths 64→512, the CLI's base LRs, and a
depth check) are the table of docs/measurements.md; their first seed set is the measurement
the docs quote (``--seed-sets 1 --threads 2``), the others the spread:

    SMUP_DATA_DIR=../shared/data python benchmarks/coord_spread.py --only-prefix llama- \
        --seed-sets 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from spectral_mup import rules
from spectral_mup.coord import model_coord_check
from spectral_mup.optim import REGISTRY, get_spec

W = (64, 128, 256, 512)
LR = 3e-3  # AdamW-like LR of the preconditioned optimizers' checks; see the records' coord_lr
SEED_SETS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))


def _width(optimizer, lr=LR, sizes=W, kinds=("sp", "mup"), **kw):
    return dict(sizes=sizes, optimizer=optimizer, lr=lr, kinds=kinds, **kw)


# name → model_coord_check arguments (seeds added per run); "patch" names a rule swap (the
# negative controls of test_coord.py)
CHECKS = {
    "adamw": _width("adamw", lr=1e-3),
    "adamw-zero-head": _width("adamw", zero_init_readout=True),
    "sgd": _width("sgd", lr=0.1),
    "depth": dict(
        axis="depth",
        sizes=(2, 4, 8, 16),
        kinds=("mup",),
        depth_alphas=(1.0, 0.0),
        optimizer="adamw",
        lr=LR,
        width=64,
    ),
    "adopt": _width("adopt"),
    "sophia": _width("sophia", lr=1e-3, optimizer_kwargs={"hessian_interval": 1}),
    "lion": _width("lion", lr=1e-3),
    "lamb": _width("lamb", lr=1e-2),
    "lamb-mup-3e-3": _width("lamb", kinds=("mup",)),
    "lamb-paper-rule": _width("lamb", kinds=("mup",), patch="lamb_paper"),
    "muon": _width("muon", lr=0.02, optimizer_kwargs={"adam_lr": LR}),
    "spectral-adamw": _width("adamw", optimizer_kwargs={"spectral_normalize": True}),
    "shampoo": _width("shampoo", sizes=W[:3]),
    "shampoo-adam": _width("shampoo", sizes=W[:3], optimizer_kwargs={"grafting": "adam"}),
    "shampoo-adam-adamw-rule": _width(
        "shampoo",
        sizes=W[:3],
        kinds=("mup",),
        optimizer_kwargs={"grafting": "adam"},
        patch="grafted_as_adamw",
    ),
    "soap": _width("soap", kinds=("mup",), optimizer_kwargs={"block_size": 0}),
    "soap-orthogonalized-rule": _width(
        "soap", kinds=("mup",), optimizer_kwargs={"block_size": 0}, patch="soap_orthogonalized"
    ),
    "soap-b128": _width("soap", optimizer_kwargs={"block_size": 128}),
    "shampoo-b128": _width("shampoo", optimizer_kwargs={"block_size": 128}),
    "shampoo-b128-adam": _width(
        "shampoo", optimizer_kwargs={"block_size": 128, "grafting": "adam"}
    ),
}


def _depth(arch: str, steps: int = 5, alphas=(1.0, 0.0), model_options=None) -> dict:
    """A depth check (2→16 at width 64, AdamW at LR) of one bundled model."""
    return dict(
        arch=arch,
        model_options=model_options,
        axis="depth",
        sizes=(2, 4, 8, 16),
        kinds=("mup",),
        depth_alphas=alphas,
        optimizer="adamw",
        lr=LR,
        width=64,
        steps=steps,
    )


def _llama(optimizer: str, model_options=None, **optimizer_kwargs) -> dict:
    """The Llama model at widths 64→512 with the CLI's base LR for ``optimizer``."""
    if optimizer == "muon":
        optimizer_kwargs["adam_lr"] = REGISTRY["muon"].aux.coord_lr
    if optimizer == "sophia":
        optimizer_kwargs["hessian_interval"] = 1
    lr = get_spec(optimizer).coord_lr
    return _width(
        optimizer,
        lr=lr,
        arch="llama",
        optimizer_kwargs=optimizer_kwargs,
        model_options=model_options,
    )


CHECKS.update(
    {
        "llama-adamw": _llama("adamw"),
        "llama-adopt": _llama("adopt"),
        "llama-lamb": _llama("lamb"),
        "llama-sophia": _llama("sophia"),
        "llama-lion": _llama("lion"),
        "llama-sgd": _llama("sgd"),
        "llama-muon": _llama("muon"),
        "llama-muon-fused-gqa": _llama("muon", model_options={"fused": True, "n_kv_heads": 1}),
        "llama-shampoo": _llama("shampoo"),
        "llama-soap": _llama("soap"),
        "llama-spectral-adamw": _llama("adamw", spectral_normalize=True),
        # the sizes tests/test_coord.py checks (widths 64→256: a third of the cost)
        "llama-adamw-256": _width(
            "adamw", lr=get_spec("adamw").coord_lr, sizes=W[:3], arch="llama"
        ),
        "llama-muon-fused-gqa-256": dict(
            _llama("muon", model_options={"fused": True, "n_kv_heads": 1}), sizes=W[:3]
        ),
        "llama-depth-20": _depth("llama", steps=20, alphas=(1.0, 0.5, 0.0)),
        "depth-20": _depth("gpt", steps=20, alphas=(1.0, 0.5, 0.0)),
        "llama-depth": _depth("llama"),
        # which of the Llama's differences makes its α = 1 residual fall at 5 steps
        "depth-rotary": _depth("gpt", alphas=(1.0,), model_options={"position": "rotary"}),
        "depth-nobias": _depth("gpt", alphas=(1.0,), model_options={"bias": False}),
        "depth-rotary-nobias": _depth(
            "gpt", alphas=(1.0,), model_options={"position": "rotary", "bias": False}
        ),
    }
)


def _patched(name: str | None):
    """Swap one rule for a check's duration (returns an undo function)."""
    import dataclasses
    import math

    if name is None:
        return lambda: None
    if name == "lamb_paper":
        old = rules.OPTIMIZER_RULES["lamb"]
        paper = dataclasses.replace(
            old.family("hidden"), norm=lambda fi, fo, c, r: math.sqrt(fo / fi)
        )
        rules.OPTIMIZER_RULES["lamb"] = dataclasses.replace(old, families={"*": paper})
        return lambda: rules.OPTIMIZER_RULES.__setitem__("lamb", old)
    attr, value = {
        "grafted_as_adamw": ("grafted_family", lambda block_size: rules.FAMILIES["entrywise"]),
        "soap_orthogonalized": ("soap_family", lambda b: rules.FAMILIES["orthogonalized"]),
    }[name]
    old = getattr(rules, attr)
    setattr(rules, attr, value)
    return lambda: setattr(rules, attr, old)


def _tied_gpt2(optimizer: str):
    """tests/test_shapes.py's GPT-2-shaped model (vocab 50257, tied head, Conv1D)."""

    def run(seeds):
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_shapes import tied_gpt2_coord_check

        return tied_gpt2_coord_check(optimizer, LR, seeds)

    return run


CUSTOM = {"tied-gpt2-adamw": _tied_gpt2("adamw"), "tied-gpt2-lamb": _tied_gpt2("lamb")}


def run_one(check: str, seeds: tuple[int, ...], threads: int) -> dict:
    torch.set_num_threads(threads)
    if check in CUSTOM:
        report = CUSTOM[check](seeds)
        return {"check": check, "seeds": list(seeds), "threads": threads, "slopes": report.slopes()}
    kwargs = dict(CHECKS[check])
    undo = _patched(kwargs.pop("patch", None))
    try:
        report = model_coord_check(seeds=seeds, **kwargs)
    finally:
        undo()
    return {"check": check, "seeds": list(seeds), "threads": threads, "slopes": report.slopes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--only-prefix", default="", help="the checks whose name starts with this")
    ap.add_argument("--seed-sets", type=int, default=len(SEED_SETS), help="the first N seed sets")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="runs/coord_spread/runs.jsonl")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or [*CHECKS, *CUSTOM]
    if args.only_prefix:
        names = [n for n in names if n.startswith(args.only_prefix)]
    threads = [int(t) for t in args.threads.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["check"], tuple(r["seeds"]), r["threads"])] = r
    for name in names:
        for seeds in SEED_SETS[: args.seed_sets]:
            for t in threads:
                if (name, seeds, t) not in done:
                    r = run_one(name, seeds, t)
                    done[(name, seeds, t)] = r
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"{name} seeds {seeds} threads {t} done", flush=True)
    print(
        "\n| check | runs | μP worst group: test seeds (range) | μP mean hidden (range) "
        "| SP min hidden (range) | SP logits (range) |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        runs = [r for (n, _, _), r in done.items() if n == name]
        print(summary_row(name, runs))
    for name in names:
        runs = [r for (n, _, _), r in done.items() if n == name]
        detail(name, runs)


HIDDEN = ("block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "residual")


def _test_run(runs: list[dict]) -> dict:
    return next(
        (r for r in runs if tuple(r["seeds"]) == SEED_SETS[0] and r["threads"] == 2), runs[0]
    )


def _range(values: list[float]) -> str:
    return f"{min(values):+.2f}…{max(values):+.2f}"


def summary_row(name: str, runs: list[dict]) -> str:
    """One table row: the μP group farthest from 0 (W₀·Δx, which vanishes by design, left
    out), the mean over hidden groups, and SP's smallest hidden slope and logits slope."""
    mup = [r["slopes"].get("mup") or r["slopes"].get("mup α=1") for r in runs]
    groups = [g for g in mup[0] if not g.endswith("W₀·Δx")]
    worst = max(groups, key=lambda g: max(abs(m[g]) for m in mup))
    t = _test_run(runs)["slopes"]
    t_mup = t.get("mup") or t.get("mup α=1")
    cells = [f"{worst} {t_mup[worst]:+.2f} ({_range([m[worst] for m in mup])})"]
    if all(g in mup[0] for g in HIDDEN):
        cells.append(_range([sum(m[g] for g in HIDDEN) / 5 for m in mup]))
    else:
        cells.append("—")
    if "sp" in runs[0]["slopes"]:
        cells.append(_range([min(r["slopes"]["sp"][g] for g in HIDDEN) for r in runs]))
        cells.append(_range([r["slopes"]["sp"]["logits"] for r in runs]))
    else:
        cells += ["—", "—"]
    return f"| {name} | {len(runs)} | " + " | ".join(cells) + " |"


def detail(name: str, runs: list[dict]) -> None:
    spread: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in runs:
        for label, slopes in r["slopes"].items():
            for group, s in slopes.items():
                spread[label, group].append(s)
    test_run = _test_run(runs)
    print(f"\n## {name} ({len(runs)} runs)\n")
    print("| row | group | test seeds, 2 threads | min | max |")
    print("|---|---|---|---|---|")
    for (label, group), values in spread.items():
        s0 = test_run["slopes"][label][group]
        print(f"| {label} | {group} | {s0:+.3f} | {min(values):+.3f} | {max(values):+.3f} |")


if __name__ == "__main__":
    main()
