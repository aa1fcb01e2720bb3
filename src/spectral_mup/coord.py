"""Coordinate checks (Yang et al. TP-V §D.1; the seed paper's Figs. 2–7).

Train copies of a model at several widths (or depths) for a few steps and record, for each
layer group, the RMS of its output and of the output's change since step 0 on a fixed
batch. Under μP the change RMS is flat in width (log-log slope ≈ 0); under SP it grows.
The fitted slope of the change RMS at the last step is the number to check.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import load_dataset
from .errors import ConfigError
from .fileio import atomic_write, write_json
from .models import build_model, config_class
from .optim import build_optimizer, get_spec, resolve_rule
from .parametrize import Parametrization
from .roles import module_layout
from .train.objective import loss_fn, update_hessian

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CoordReport:
    """Per (parametrization label, size, seed, step, layer group): output RMS and change RMS."""

    axis: str
    sizes: list[int]
    labels: list[str]
    groups: list[str]
    steps: int
    seeds: list[int]
    optimizer: str
    lr: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def curve(
        self, label: str, group: str, step: int | None = None, metric: str = "change"
    ) -> list[float]:
        """Seed-mean of ``metric`` at ``step`` (default: last) for each size."""
        step = self.steps if step is None else step
        out = []
        for size in self.sizes:
            vals = [
                r[metric]
                for r in self.records
                if r["label"] == label
                and r["group"] == group
                and r["size"] == size
                and r["step"] == step
            ]
            out.append(float(np.mean(vals)) if vals else math.nan)
        return out

    def slope(
        self, label: str, group: str, step: int | None = None, metric: str = "change"
    ) -> float:
        """Least-squares slope of log(metric) against log(size)."""
        y = np.array(self.curve(label, group, step, metric))
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            return math.nan
        return float(np.polyfit(np.log(self.sizes), np.log(y), 1)[0])

    def slopes(self, metric: str = "change") -> dict[str, dict[str, float]]:
        return {
            lab: {g: self.slope(lab, g, metric=metric) for g in self.groups} for lab in self.labels
        }

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["slopes"] = self.slopes()
        d["output_slopes"] = self.slopes("rms")
        return d

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    def plot(self, path: str | Path) -> Path:
        """PNG grid: one row per parametrization, one panel per layer group; x = size,
        y = change RMS, one line per step (log-log)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        nrow, ncol = len(self.labels), len(self.groups)
        fig, axes = plt.subplots(
            nrow, ncol, figsize=(2.6 * ncol, 2.4 * nrow), squeeze=False, sharex=True
        )
        colors = plt.cm.viridis(np.linspace(0, 0.9, self.steps))
        for i, label in enumerate(self.labels):
            for j, group in enumerate(self.groups):
                ax = axes[i][j]
                for step in range(1, self.steps + 1):
                    ax.plot(
                        self.sizes,
                        self.curve(label, group, step),
                        "o-",
                        ms=3,
                        color=colors[step - 1],
                        label=f"t={step}",
                    )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{group}\nslope {self.slope(label, group):+.2f}", fontsize=8)
                ax.tick_params(labelsize=7)
                if j == 0:
                    ax.set_ylabel(f"{label}\nΔ RMS", fontsize=8)
                if i == nrow - 1:
                    ax.set_xlabel(self.axis, fontsize=8)
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(
            f"coordinate check: {self.optimizer}, lr {self.lr:g}, {len(self.seeds)} seeds",
            fontsize=10,
        )
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        return Path(path)


def default_taps(model: nn.Module) -> dict[str, nn.Module]:
    """``model.coord_taps()`` if the model defines it, else every leaf module with parameters."""
    if hasattr(model, "coord_taps"):
        return model.coord_taps()
    return {
        name: m
        for name, m in model.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    }


def _rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def coord_check(
    build: Callable[[int, Parametrization], nn.Module],
    parametrizations: Mapping[str, Parametrization],
    sizes: Sequence[int],
    batches: Sequence[Batch],
    *,
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: str = "adamw",
    lr: float = 1e-2,
    steps: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    axis: str = "width",
    taps: Callable[[nn.Module], Mapping[str, nn.Module]] = default_taps,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    hessian: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None = None,
    split_terms: Sequence[str] = (),
    progress: bool = False,
) -> CoordReport:
    """Run a coordinate check.

    Args:
        build: ``build(size, p)`` returns a fresh model (seeded by the caller's RNG state).
        parametrizations: label → Parametrization, one row each (e.g. ``{"sp": ..., "mup": ...}``).
        sizes: widths (or depths) to compare.
        batches: training batches, used in turn; ``batches[0]`` is also the probe batch.
        loss: ``loss(model, x, y)`` -> scalar.
        optimizer, lr, optimizer_kwargs: passed to ``build_optimizer``.
        steps: training steps; seeds: one model per seed.
        taps: ``taps(model)`` -> layer group name → module whose output is recorded; groups
            missing at some size are dropped.
        hessian: ``hessian(model, opt, x)`` refreshes the curvature estimate of an optimizer
            that keeps one (Sophia's ``hessian_interval``), every ``hessian_interval`` steps
            as in training; required for such an optimizer, which would otherwise run as
            sign-momentum.
        split_terms: groups whose tap is a Linear/Conv1D layer (e.g. the readout): their
            change y_t − y_0 = ΔW·x_t + W₀·Δx (+ Δbias) is also recorded term by term, as groups
            ``"G:ΔW·x"`` (the layer's own update, what its rule is about) and ``"G:W₀·Δx"``
            (the change of its input seen through the initial weights; for a readout under
            μP it vanishes as 1/sqrt(m), so at small widths it can dominate the total).
    """
    if len(set(sizes)) < 2:
        raise ConfigError(f"a coordinate check needs at least two different sizes, got {sizes}")
    records: list[dict[str, Any]] = []
    group_sets: list[list[str]] = []
    runs = [(lab, size, seed) for lab in parametrizations for size in sizes for seed in seeds]
    for label, size, seed in tqdm(runs, desc="coord-check", disable=not progress or None):
        p = parametrizations[label]
        torch.manual_seed(seed)
        model = build(size, p)
        opt = build_optimizer(optimizer, model, p, lr, **dict(optimizer_kwargs or {}))
        hessian_every = get_spec(optimizer).curvature_interval(opt)
        if hessian_every and hessian is None:
            raise ConfigError(
                f"{optimizer} keeps a Hessian estimate: pass coord_check(hessian=...) (e.g. "
                "spectral_mup.train.update_hessian for a language model)"
            )
        tapped = dict(taps(model))
        for g in split_terms:
            if g not in tapped or _weight_of(tapped[g]) is None:
                raise ConfigError(f"split_terms: {g!r} is not a tapped Linear/Conv1D layer")
        terms = [f"{g}:{t}" for g in split_terms for t in ("ΔW·x", "W₀·Δx")]
        group_sets.append([*tapped, *terms])
        row = functools.partial(_row, label, size, seed)
        records += _trajectory(model, opt, tapped, batches, loss, steps, split_terms, row,
                               hessian if hessian_every else None, hessian_every)  # fmt: skip
    groups = [g for g in group_sets[0] if all(g in s for s in group_sets)] if group_sets else []
    return CoordReport(
        axis,
        list(sizes),
        list(parametrizations),
        groups,
        steps,
        list(seeds),
        optimizer,
        lr,
        records,
    )


def _trajectory(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tapped: Mapping[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    split_terms: Sequence[str],
    row: Callable[..., dict[str, Any]],
    hessian: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None,
    hessian_every: int,
) -> list[dict[str, Any]]:
    """One model's rows (``row(step, group, rms, change)``): every tapped group's output
    RMS and change from step 0 on the probe batch ``batches[0]``, at steps 0 … ``steps``,
    and the split terms of ``split_terms`` (``coord_check``); ``hessian`` refreshes the
    curvature estimate every ``hessian_every`` steps."""
    records = []
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(_recorder(outputs, g, inputs if g in split_terms else None))
        for g, m in tapped.items()
    ]
    start = _measure(model, batches[0][0], outputs)
    x0 = {g: inputs[g].clone() for g in split_terms}
    w0 = {g: _weight_of(tapped[g]).detach().clone() for g in split_terms}
    for g, out in start.items():
        records.append(row(0, g, _rms(out), 0.0))
    for g in split_terms:
        records += [row(0, f"{g}:{t}", 0.0, 0.0) for t in ("ΔW·x", "W₀·Δx")]
    for step in range(1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        opt.step()
        if hessian_every and step % hessian_every == 0:
            hessian(model, opt, x)
        now = _measure(model, batches[0][0], outputs)
        for g, out in now.items():
            records.append(row(step, g, _rms(out), _rms(out - start[g])))
        for g in split_terms:
            module = tapped[g]
            with torch.no_grad():
                own = _apply(module, inputs[g], _weight_of(module) - w0[g])
                seen = _apply(module, inputs[g] - x0[g], w0[g])
            for name, term in ((f"{g}:ΔW·x", own), (f"{g}:W₀·Δx", seen)):
                records.append(row(step, name, _rms(term), _rms(term)))
    for h in hooks:
        h.remove()
    return records


@torch.no_grad()
def _measure(model: nn.Module, x: torch.Tensor, outputs: dict[str, torch.Tensor]):
    """Forward the probe batch; the tap hooks fill ``outputs``."""
    model(x)
    return {g: out.clone() for g, out in outputs.items()}


def _row(label: str, size: int, seed: int, step: int, group: str, rms: float, change: float):
    return {
        "label": label,
        "size": size,
        "seed": seed,
        "step": step,
        "group": group,
        "rms": rms,
        "change": change,
    }


def _recorder(
    store: dict[str, torch.Tensor], group: str, inputs: dict[str, torch.Tensor] | None = None
):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        store[group] = (output[0] if isinstance(output, tuple) else output).detach()
        if inputs is not None:  # the input after forward pre-hooks (a readout multiplier's)
            inputs[group] = args[0].detach()

    return hook


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    layout = module_layout(module, "weight")
    ok = isinstance(weight, torch.Tensor) and weight.ndim == 2
    return weight if ok and layout in ("linear", "transposed") else None


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x through ``weight`` in the module's layout, without bias."""
    if module_layout(module, "weight") == "transposed":
        return x @ weight
    return torch.nn.functional.linear(x, weight)


def model_coord_check(
    *,
    arch: str = "gpt",
    axis: str = "width",
    sizes: Sequence[int] = (64, 128, 256, 512),
    kinds: Sequence[str] = ("sp", "mup"),
    depth_alphas: Sequence[float] = (1.0,),
    optimizer: str = "adamw",
    lr: float = 1e-2,
    steps: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    width: int = 64,
    depth: int = 2,
    n_heads: int = 2,
    batch_size: int = 8,
    block_size: int = 64,
    data: str | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    zero_init_readout: bool = False,
    split_terms: Sequence[str] | None = None,
    model_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> CoordReport:
    """Coordinate check of a bundled model (``arch``: ``"gpt"`` or ``"llama"``) on Tiny
    Shakespeare (or ``data``). ``model_options``: more fields of its config (e.g.
    ``{"n_kv_heads": 1}``, ``{"fused": True}``, ``{"head_dim": 16}``), as at the smallest
    size; the other sizes are that config ``resized`` (so fixed-size heads are added with
    width, key/value groups kept).

    Every row is built as training builds it (σ_b-initialized head), so SP and μP differ
    only in the parametrization. ``zero_init_readout=True`` is the zero-head protocol, in
    every row (never for an optimizer whose update follows ‖W‖, such as LAMB): the logit
    change is then ΔW·h/m, driven by the updates alone. Sophia's Hessian estimate is
    refreshed every ``hessian_interval`` steps, as in training (pass a small interval in
    ``optimizer_kwargs`` to exercise it within a few steps). ``split_terms``: the logit
    change is also recorded as its two parts, ``logits:ΔW·x`` (the head's own update) and
    ``logits:W₀·Δx`` (``coord_check``); default ``("logits",)``, none with a zero head
    (whose W₀·Δx is 0).

    ``axis="width"``: ``sizes`` are widths at fixed ``depth``, base width = smallest width.
    ``axis="depth"``: ``sizes`` are depths at fixed ``width``, base depth = smallest depth.
    One row per kind × α (the label carries α when several are given).
    """
    config_cls = config_class(arch)  # an unknown arch fails before the data loads
    dataset = load_dataset(data)
    gen = torch.Generator().manual_seed(1234)
    batches = [dataset.get_batch("train", batch_size, block_size, gen) for _ in range(steps)]
    base = min(sizes)
    rule = resolve_rule(optimizer, **dict(optimizer_kwargs or {}))
    zero_readout = zero_init_readout and not rule.follows_weight
    if split_terms is None:
        split_terms = () if zero_readout else ("logits",)
    bases = {"base_width": base, "base_depth": depth} if axis == "width" else {
        "base_width": width, "base_depth": base}  # fmt: skip
    params = _rows(kinds, depth_alphas, zero_init_readout=zero_readout, **bases)

    configs = _sized_configs(config_cls, axis, sizes, width, depth, n_heads,
                             block_size, dataset.vocab_size, model_options)  # fmt: skip

    def build(size: int, p: Parametrization) -> nn.Module:
        return build_model(configs[size], p)

    return coord_check(
        build,
        params,
        sizes,
        batches,
        loss=loss_fn,
        optimizer=optimizer,
        lr=lr,
        steps=steps,
        seeds=seeds,
        axis=axis,
        optimizer_kwargs=optimizer_kwargs,
        hessian=update_hessian,
        split_terms=split_terms,
        progress=progress,
    )


def _sized_configs(
    config_cls: type,
    axis: str,
    sizes: Sequence[int],
    width: int,
    depth: int,
    n_heads: int,
    block_size: int,
    vocab_size: int,
    model_options: Mapping[str, Any] | None,
) -> dict[int, Any]:
    """Each size's model config: the smallest model with ``model_options`` as given (its
    head count from ``head_dim`` when that is set), resized to every size — all built before
    anything trains, so a size that cannot be built fails first."""
    options = dict(model_options or {})
    base = min(sizes)
    w0, d0 = (base, depth) if axis == "width" else (width, base)
    if options.get("head_dim"):
        options.setdefault("n_heads", w0 // options["head_dim"])
    options.setdefault("n_heads", n_heads)
    smallest = config_cls(
        width=w0, depth=d0, vocab_size=vocab_size, block_size=block_size, **options
    )
    return {
        size: smallest.resized(*((size, depth) if axis == "width" else (width, size)))
        for size in sizes
    }


def _rows(
    kinds: Sequence[str], depth_alphas: Sequence[float], **common: Any
) -> dict[str, Parametrization]:
    """A coordinate check's rows: one Parametrization per kind × α (μP only; the label
    carries α when several are given), each with the ``common`` fields."""
    params: dict[str, Parametrization] = {}
    for kind in kinds:
        for alpha in depth_alphas if kind == "mup" else (0.0,):
            label = kind if len(depth_alphas) == 1 or kind == "sp" else f"{kind} α={alpha:g}"
            params[label] = Parametrization(kind=kind, depth_alpha=alpha, **common)
    return params
