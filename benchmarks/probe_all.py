"""Probe every registered optimizer and four torch.optim ones (docs/probe.md).

For each: the probed width exponent per group beside the one rules.py's registered rule
predicts (registered optimizers), the family the probe picks, k, the eps rule, wall time.
One process; resumable (each probe's JSON is kept in --out and skipped when present).

    SMUP_DATA_DIR=../shared/data python benchmarks/probe_all.py --out runs/probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spectral_mup import rules
from spectral_mup.probe import (
    GROUPS,
    ProbeResult,
    cache_path,
    full_options,
    predicted_exponents,
    probe,
)

# Unblocked Shampoo eigendecomposes 2048 × 2048 factors every step at width 512 (about 12
# minutes a probe on 2 CPU cores): its two unblocked variants are probed at widths 64 → 256.
NARROW = {"shampoo", "shampoo grafted adam"}
CASES = [  # (label, optimizer, options, spectral_normalize), cheapest first
    ("adamw", "adamw", {}, False),
    ("adopt", "adopt", {}, False),
    ("lamb", "lamb", {}, False),
    ("sophia", "sophia", {}, False),
    ("lion", "lion", {}, False),
    ("sgd", "sgd", {}, False),
    ("muon", "muon", {}, False),
    ("soap", "soap", {}, False),
    ("spectral(adamw)", "adamw", {}, True),
    ("torch.optim.Adagrad", "torch.optim.Adagrad", {}, False),
    ("torch.optim.RMSprop", "torch.optim.RMSprop", {}, False),
    ("torch.optim.NAdam", "torch.optim.NAdam", {}, False),
    ("torch.optim.RAdam", "torch.optim.RAdam", {}, False),
    ("shampoo", "shampoo", {}, False),
    ("shampoo grafted adam", "shampoo", {"grafting": "adam"}, False),
    ("shampoo blocked 128", "shampoo", {"block_size": 128}, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name, options, spectral in CASES:
        if args.only and label not in args.only:
            continue
        path = out / (label.replace(" ", "_") + ".json")
        if not path.exists():
            widths = (64, 128, 256) if label in NARROW else (64, 128, 256, 512)
            result = probe(name, options=options, spectral_normalize=spectral, widths=widths)
            result.save_json(path)
            print(result.table(), flush=True)
            if name not in rules.OPTIMIZER_RULES:  # build_optimizer(name, …) finds it there
                result.save_json(cache_path(name, full_options(name, options)))
        result = ProbeResult.from_json(json.loads(path.read_text()), rederive=True)
        data = result.to_json()
        want = {}
        if name in rules.OPTIMIZER_RULES:
            rule = rules.rule_for(name, full_options(name, options))
            rule = rule.spectral_normalized() if spectral else rule
            want = predicted_exponents(rule, result)
        rows.append((label, data, want))
    print("\nwidth exponent of ‖c·ΔW‖/lr, fitted ± spread (rules.py's registered rule)\n")
    print("| optimizer | " + " | ".join(GROUPS) + " | max Δ | k | depth | eps | family | s |")
    print("|---|" + "---|" * (len(GROUPS) + 7))
    for label, data, want in rows:
        cells, worst = [], 0.0
        for g in GROUPS:
            e, s = data["exponents"].get(g, (float("nan"), 0))
            cell = f"{e:+.2f}±{s:.2f}"
            if g in want:
                cell += f" ({want[g]:+.2f})"
                worst = max(worst, abs(e - want[g]))
            cells.append(cell)
        by_family: dict[str, list[str]] = {}
        for role, fam in data["families"].items():
            by_family.setdefault(fam, []).append(role)
        family = "; ".join(f"{', '.join(r)}: {f}" for f, r in by_family.items())
        if len(by_family) == 1:
            family = next(iter(by_family))
        eps = "/".join(sorted({str(v) for v in data["eps"].values()}))
        depth = f"{data['depth_exponents'][0]:+.2f}" if data["depths"] else "-"
        print(
            f"| {label} | " + " | ".join(cells) + f" | {worst:.2f} | {data['k'][0]:.2f} | {depth} "
            f"| {eps} | {family} | {data['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
