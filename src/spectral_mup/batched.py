"""K training runs of one shape stacked into one model (issue 13: batched sweeps).

A sweep's runs are small and of few shapes, so a process spends most of a step in per-op
overhead. Stacking K runs that share a shape (their configs differ only in LR, weight
decay, seed and the per-role LR, init and forward multipliers) turns K small ops into one
batched op:

- ``stack(models)`` copies the first model and replaces each of its layers (``nn.Linear``,
  ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``) by a stacked layer whose weight is the
  K runs' weights, ``[K, ...]``, under the same parameter name. Activations carry the K runs
  in the batch dimension, run-major (``[K·B, ...]``), so the model's own forward — reshapes,
  attention (SDPA on ``[K·B, heads, T, d]``, no vmap fallback), residual and μP multipliers —
  runs unchanged; each stacked layer views its input as ``[K, B·…, features]`` and applies a
  batched matmul (``bmm``), a per-run gather or a per-run norm gain. A forward multiplier
  that differs between the runs becomes one value per run (``models.common.PerRun``). A
  model with any other parameter-holding layer, or another number that differs between the
  runs, is refused (``NotBatchable``), so a sweep falls back to one run per process instead
  of computing something else.
- ``SliceLR`` gives every run its own per-tensor LR and weight decay on top of an optimizer
  whose update is linear in the LR and whose state does not depend on it (AdamW, Lion,
  ADOPT, SGD): the wrapped optimizer steps with LR 1 and no decay, and each run's slice of
  the change d is rescaled: ``p ← p·(1 − lr_k·λ_k) + lr_k·d`` (decoupled decay), or, for
  an optimizer whose decay is an L2 term of the gradient (torch's SGD), ``g ← g + λ_k·p``
  before the step and ``p ← p + lr_k·d`` after it.

``tests/test_batched.py`` checks both against K separate models and optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SmupError


class NotBatchable(SmupError):
    """The runs or the model cannot be stacked; train them one by one."""


class _Shape:
    """The stack's K and the current per-run batch size B, shared by its layers."""

    def __init__(self, k: int):
        self.k, self.b = k, 1


def _stacked(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


class _StackedLayer(nn.Module):
    """A layer of K runs. Its tensors ``[K, ...]`` are either its own parameters (one
    optimizer steps all runs: SliceLR) or, with ``leaves``, stacked at every forward from
    the K runs' own parameters (each run's own optimizer steps them, any optimizer)."""

    def _take(self, layers: Sequence[nn.Module], names: Sequence[str], leaves: bool) -> None:
        self._leaves: dict[str, list[nn.Parameter]] = {}
        for name in names:
            tensors = [getattr(m, name) for m in layers]
            if tensors[0] is None:
                setattr(self, name, None)
            elif leaves:
                self._leaves[name] = tensors
            else:
                setattr(self, name, _stacked(tensors))

    def tensor(self, name: str) -> torch.Tensor | None:
        if name in self._leaves:
            return torch.stack(self._leaves[name])
        return getattr(self, name)


class StackedLinear(_StackedLayer):
    def __init__(self, layers: Sequence[nn.Linear], shape: _Shape, leaves: bool = False):
        super().__init__()
        self.shape = shape
        self._take(layers, ("weight", "bias"), leaves)  # weight [K, out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, lead = self.shape.k, x.shape[:-1]
        xk = x.reshape(k, -1, x.shape[-1])
        wt, bias = self.tensor("weight").transpose(1, 2), self.tensor("bias")
        y = torch.bmm(xk, wt) if bias is None else torch.baddbmm(bias[:, None], xk, wt)
        return y.reshape(*lead, y.shape[-1])


class StackedEmbedding(_StackedLayer):
    def __init__(self, layers: Sequence[nn.Embedding], shape: _Shape, leaves: bool = False):
        super().__init__()
        if any(m.padding_idx is not None or m.max_norm is not None for m in layers):
            raise NotBatchable("an Embedding with padding_idx or max_norm cannot be stacked")
        self.shape = shape
        self._take(layers, ("weight",), leaves)  # [K, num, dim]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        k, b = self.shape.k, self.shape.b
        weight = self.tensor("weight")
        rows = torch.arange(k, device=idx.device)
        if idx.dim() == 1:  # shared positions (GPT's wpe): the same rows for every batch item
            out = weight[:, idx]  # [K, T, dim]
            return out[:, None].expand(k, b, *out.shape[1:]).reshape(k * b, *out.shape[1:])
        ik = idx.reshape(k, -1)
        out = weight[rows[:, None], ik]  # [K, B·…, dim]
        return out.reshape(*idx.shape, out.shape[-1])


class StackedNorm(_StackedLayer):
    """LayerNorm or RMSNorm over the last dimension with per-run gain (and bias)."""

    def __init__(
        self, layers: Sequence[nn.LayerNorm | nn.RMSNorm], shape: _Shape, leaves: bool = False
    ):
        super().__init__()
        first = layers[0]
        if len(first.normalized_shape) != 1:
            raise NotBatchable("a norm over more than the last dimension cannot be stacked")
        self.shape, self.rms = shape, isinstance(first, nn.RMSNorm)
        self.eps = first.eps
        self.dim = first.normalized_shape[0]
        if getattr(first, "bias", None) is None:
            layers = [_NoBias(m) for m in layers]
        self._take(layers, ("weight", "bias"), leaves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (self.dim,)
        y = F.rms_norm(x, dims, eps=self.eps) if self.rms else F.layer_norm(x, dims, eps=self.eps)
        yk = y.reshape(self.shape.k, -1, self.dim)
        weight, bias = self.tensor("weight"), self.tensor("bias")
        if weight is not None:
            yk = yk * weight[:, None]
        if bias is not None:
            yk = yk + bias[:, None]
        return yk.reshape(x.shape)


class _NoBias:
    """A norm seen through ``_take``: its weight, and no bias (RMSNorm has no attribute)."""

    def __init__(self, norm: nn.Module):
        self.weight, self.bias = norm.weight, None


_LAYERS: dict[type, type] = {
    nn.Linear: StackedLinear,
    nn.Embedding: StackedEmbedding,
    nn.LayerNorm: StackedNorm,
    nn.RMSNorm: StackedNorm,
}


class Stacked(nn.Module):
    """K models of one shape as one: ``forward(x)`` takes ``[K, B, ...]`` inputs and returns
    ``[K, B, ...]`` outputs, run k's from its own weights (``stack``)."""

    def __init__(self, inner: nn.Module, shape: _Shape, singles: Sequence[nn.Module] = ()):
        super().__init__()
        self.inner, self.shape = inner, shape
        self.singles = list(singles)  # leaves mode: the runs' own models (not submodules)

    @property
    def k(self) -> int:
        return self.shape.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.k:
            raise ValueError(f"input's first dimension must be the {self.k} runs, got {x.shape}")
        self.shape.b = x.shape[1]
        y = self.inner(x.reshape(self.k * x.shape[1], *x.shape[2:]))
        return y.reshape(self.k, x.shape[1], *y.shape[1:])

    def run_state(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's weights under the single model's parameter names (its state_dict)."""
        if self.singles:
            return {n: q.detach().clone() for n, q in self.singles[k].named_parameters()}
        return {name: q[k].detach().clone() for name, q in self.inner.named_parameters()}


def stack(models: Sequence[nn.Module], *, leaves: bool = False) -> Stacked:
    """The K models as one ``Stacked`` model (module docstring). Every model must have the
    same structure and parameter shapes; roles (``smup_roles``) follow the first model.
    ``leaves``: the stack computes with the models' own parameters (stacked at every
    forward), so each run's own optimizer, whatever it is, steps its own model; otherwise
    the stack holds copies ``[K, ...]`` under the single model's names (``SliceLR``)."""
    if not models:
        raise NotBatchable("nothing to stack")
    names = [n for n, _ in models[0].named_parameters()]
    shapes = [q.shape for _, q in models[0].named_parameters()]
    for m in models[1:]:
        if [n for n, _ in m.named_parameters()] != names or [
            q.shape for _, q in m.named_parameters()
        ] != shapes:
            raise NotBatchable("the models differ in their parameters; only one shape stacks")
    every = [n for n, _ in models[0].named_parameters(remove_duplicate=False)]
    if len(every) != len(names):  # a parameter shared by two layers (a tied head)
        raise NotBatchable("a model with shared (tied) parameters cannot be stacked")
    shape = _Shape(len(models))
    inner = copy.deepcopy(models[0])
    per_model = [dict(m.named_modules()) for m in models]
    for name, module in list(inner.named_modules()):
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        kind = _LAYERS.get(type(module))
        if kind is None:
            raise NotBatchable(
                f"{name or 'the model'} ({type(module).__name__}) holds parameters in a layer "
                f"that cannot be stacked (only {', '.join(t.__name__ for t in _LAYERS)})"
            )
        stacked = kind([pm[name] for pm in per_model], shape, leaves)
        parent, _, attr = name.rpartition(".")
        setattr(inner.get_submodule(parent) if parent else inner, attr, stacked)
    _per_run_numbers(inner, per_model)
    return Stacked(inner, shape, models if leaves else ())


# the bundled models' forward multipliers (readout, attention scale, residual branch)
_MULTIPLIERS = ("readout_multiplier", "scale", "branch_multiplier")


def _per_run_numbers(inner: nn.Module, per_model: Sequence[dict[str, nn.Module]]) -> None:
    """Every number a module of the stack holds (an attention scale, an ε, …) is the first
    run's: equal in every run, or, for a bundled model's forward multiplier, one value per
    run (``models.common.PerRun``); any other difference refuses (``NotBatchable``) rather
    than train every run with the first one's value."""
    from .models.common import PerRun

    for name, module in inner.named_modules():
        first = per_model[0][name]  # the run's own module (a stacked layer: its first layer)
        for attr, value in vars(first).items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if attr.startswith("_") or not number:
                continue
            values = [vars(pm[name]).get(attr) for pm in per_model]
            if all(v == value for v in values):
                continue
            ours = type(first).__module__.startswith("spectral_mup.models")
            if attr not in _MULTIPLIERS or not ours or isinstance(module, _StackedLayer):
                raise NotBatchable(
                    f"{name or 'the model'}.{attr} differs between the runs ({values}): they "
                    "train one by one"
                )
            setattr(module, attr, PerRun(values))


# ------------------------------------------------------------------- per-run LR and decay


class SliceLR:
    """Per-run, per-tensor LR and weight decay for a stacked model (module docstring).

    ``optimizer`` was built on the stacked parameters with LR 1 and no weight decay; ``lrs``
    and ``wds`` map each stacked parameter to its K runs' values (``[K]`` tensors), taken
    from each run's own param groups. ``decay`` is ``"decoupled"`` (p·(1 − lr·λ)) or ``"l2"``
    (λ·p added to the gradient); ``first_decay=False``: the optimizer neither moves nor
    decays at its first step (ADOPT). ``factors``: the K runs' LR schedule factors.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lrs: Mapping[nn.Parameter, torch.Tensor],
        wds: Mapping[nn.Parameter, torch.Tensor],
        decay: str = "decoupled",
        *,
        first_decay: bool = True,
    ):
        if decay not in ("decoupled", "l2"):
            raise ValueError(f"decay must be decoupled or l2, got {decay!r}")
        for group in optimizer.param_groups:
            if group["lr"] != 1.0 or group.get("weight_decay", 0.0) != 0.0:
                raise ValueError("SliceLR needs an optimizer built with lr=1, weight_decay=0")
        self.opt, self.decay, self.first_decay = optimizer, decay, first_decay
        self.lrs, self.wds = dict(lrs), dict(wds)
        self.steps = 0
        self.params = [q for g in optimizer.param_groups for q in g["params"]]

    @torch.no_grad()
    def step(self, factors: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """One step; ``factors``: ``[K]`` schedule factors; ``active``: ``[K]`` bools, a
        run that is not active (diverged, stopped) keeps its weights."""

        def per_run(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            return v.to(q.dtype).reshape(-1, *([1] * (q.dim() - 1)))

        old = {}
        for q in self.params:
            if q.grad is None:
                continue
            if active is not None:  # a stopped run's (maybe non-finite) gradient moves nothing
                q.grad.masked_fill_(~per_run(active, q).bool(), 0.0)
            if self.decay == "l2":
                q.grad.add_(q * per_run(self.wds[q], q))
            old[q] = q.detach().clone()
        self.opt.step()
        self.steps += 1
        decays = self.decay == "decoupled" and (self.first_decay or self.steps > 1)
        for q, before in old.items():
            lr = per_run(self.lrs[q] * factors, q)
            d = q - before
            if decays:
                new = before * (1 - lr * per_run(self.wds[q], q)) + lr * d
            else:
                new = before + lr * d
            if active is not None:
                new = torch.where(per_run(active, q).bool(), new, before)
            q.copy_(new)


def slice_hparams(
    stacked: Stacked, groups_per_run: Sequence[Sequence[Mapping[str, Any]]]
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor]]:
    """Per stacked parameter, the K runs' ``lr`` and ``weight_decay`` from each run's own
    param groups (``param_groups``/``build_optimizer`` on the single model, ``names``)."""
    per_name: list[dict[str, tuple[float, float]]] = []
    for groups in groups_per_run:
        per_name.append(
            {n: (g["lr"], g.get("weight_decay", 0.0)) for g in groups for n in g["names"]}
        )
    lrs, wds = {}, {}
    for name, q in stacked.inner.named_parameters():
        try:
            values = [d[name] for d in per_name]
        except KeyError:
            raise NotBatchable(f"parameter {name} is in no param group of some run") from None
        lrs[q] = torch.tensor([v[0] for v in values], dtype=torch.float64)
        wds[q] = torch.tensor([v[1] for v in values], dtype=torch.float64)
    return lrs, wds


_PER_RUN_KEYS = {"params", "names", "lr", "weight_decay", "lr_mult", "initial_lr"}


def _decay_mode(opt: torch.optim.Optimizer) -> tuple[str, bool]:
    """How the optimizer applies weight decay (SliceLR's ``decay`` and ``first_decay``), for
    the optimizers whose update is linear in the LR with LR-free state; NotBatchable for any
    other."""
    from .optim import record_for_class

    stacking = record_for_class(type(opt)).stacking  # ADOPT: by its decouple option
    if stacking is None:
        raise NotBatchable(f"{type(opt).__name__} steps are not batched (yet): one run per process")
    return stacking.mode(opt.defaults)


def stacked_optimizer(stacked: Stacked, optimizers: Sequence[torch.optim.Optimizer]) -> SliceLR:
    """The optimizer of a stacked model from the K runs' own optimizers (built on their
    single models by ``build_optimizer``): one group per stacked tensor with the runs'
    shared options (ε, betas, …; they must agree) at LR 1 and no decay, wrapped in SliceLR
    with each run's LR and decay of that tensor."""
    if len(optimizers) != stacked.k or len({type(o) for o in optimizers}) != 1:
        raise NotBatchable("one optimizer of one class per stacked run is needed")
    mode, first_decay = _decay_mode(optimizers[0])
    per_run = []
    for opt in optimizers:
        per_run.append({n: g for g in opt.param_groups for n in g.get("names", ())})
    groups = []
    for name, q in stacked.inner.named_parameters():
        try:
            own = [d[name] for d in per_run]
        except KeyError:
            raise NotBatchable(f"parameter {name} is in no named param group of some run") from None
        shared = [{k: v for k, v in g.items() if k not in _PER_RUN_KEYS} for g in own]
        if any(s != shared[0] for s in shared[1:]):
            raise NotBatchable(f"the runs' optimizer options for {name} differ beyond lr and decay")
        groups.append({**shared[0], "params": [q], "lr": 1.0, "weight_decay": 0.0})
    opt = type(optimizers[0])(groups, lr=1.0)
    lrs, wds = slice_hparams(stacked, [o.param_groups for o in optimizers])
    return SliceLR(opt, lrs, wds, mode, first_decay=first_decay)


# --------------------------------------------------------------------------- training


def _per_run_keys() -> set[tuple[str, str]]:
    """Config keys that may differ between the runs of one stack (everything else must
    match): every optimizer option but its name and Sophia's Hessian cadence (each run has
    its own optimizer; the slices mode needs them equal and otherwise steps per run), the
    seed and run dir, the per-role LR and init multipliers (param groups and init) and the
    forward multipliers ``readout_scale`` and ``attention_mult`` (one value per run in the
    stacked model, ``models.common.PerRun``)."""
    import dataclasses

    from .config import OptimSection
    from .optim import RECORDS

    optim = {("optim", f.name) for f in dataclasses.fields(OptimSection)}
    cadence = {("optim", r.curvature.interval) for r in RECORDS if r.curvature}
    return (optim - {("optim", "name"), *cadence}) | {
        ("train", "seed"),
        ("train", "out_dir"),
        *(("param", k) for k in ("lr_input", "lr_output", "lr_vector", "init_std", "init_input",
                                 "init_output", "readout_scale", "attention_mult")),
    }  # fmt: skip


PER_RUN_KEYS = _per_run_keys()


def stack_key(cfg: Any) -> str:
    """Runs with equal keys can share a stack: their configs agree outside PER_RUN_KEYS."""
    import json

    d = cfg.to_dict()
    kept = {s: {k: v for k, v in items.items() if (s, k) not in PER_RUN_KEYS}
            for s, items in d.items()}  # fmt: skip
    return json.dumps(kept, sort_keys=True, default=str)


def check_stackable(cfgs: Sequence[Any]) -> None:
    """NotBatchable unless the runs can train as one stack (no gradient accumulation, no
    compile, no pause, no dropout, one process; the same shape, data and schedule)."""
    if len({stack_key(c) for c in cfgs}) != 1:
        raise NotBatchable("the runs differ beyond LR, weight decay, seed and multipliers")
    t = cfgs[0].train
    if t.grad_accum != 1 or t.compile or t.stop_at:
        raise NotBatchable("grad_accum > 1, compile or stop_at runs train one by one")
    # a stack draws one dropout mask for all runs' rows: same distribution, other numbers
    if getattr(cfgs[0].model, "dropout", 0.0):
        raise NotBatchable("runs with dropout train one by one (their masks would differ)")
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotBatchable("stacked runs train in one process, not under torchrun")


class _SliceSteps:
    """Steps of the stacked tensors by one LR-linear optimizer (``SliceLR``)."""

    def __init__(self, stacked: Stacked, opts: Sequence[torch.optim.Optimizer], cfgs):
        from .train import lr_factor

        self.stacked, self.opt = stacked, stacked_optimizer(stacked, opts)
        self.first_lr = [o.param_groups[0]["lr"] for o in opts]
        self.factors = [lr_factor(cfg) for cfg in cfgs]
        self.clip = cfgs[0].train.grad_clip

    def zero_grad(self) -> None:
        self.opt.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.stacked.state_dict(), "opt": self.opt.opt.state_dict(),
                "steps": self.opt.steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stacked.load_state_dict(state["model"])
        self.opt.opt.load_state_dict(state["opt"])
        self.opt.steps = state["steps"]

    def step(self, it: int, active: torch.Tensor, x: torch.Tensor, forward) -> list[float]:
        if self.clip > 0:
            _clip_per_run(self.stacked, self.clip, active)
        now = torch.tensor([f(it) for f in self.factors], dtype=torch.float64)
        self.opt.step(now, active)
        return [lr * float(f) for lr, f in zip(self.first_lr, now, strict=True)]


class _RunSteps:
    """Each run's own optimizer and LR schedule on its own model (``stack(leaves=True)``),
    as ``train.run`` steps them: any optimizer, Sophia's Hessian estimates included."""

    def __init__(self, stacked: Stacked, opts: Sequence[torch.optim.Optimizer], cfgs, rngs):
        from .optim import get_spec
        from .train import lr_factor

        self.stacked, self.opts = stacked, list(opts)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(c))
                       for o, c in zip(opts, cfgs, strict=True)]  # fmt: skip
        self.clip = cfgs[0].train.grad_clip
        self.rngs = rngs  # each run's global-RNG stream (Sophia draws its labels' uniforms)
        self.every = get_spec(cfgs[0].optim.name).curvature_interval(opts[0])

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": [m.state_dict() for m in self.stacked.singles],
            "opts": [o.state_dict() for o in self.opts],
            "scheds": [s.state_dict() for s in self.scheds],
            "rngs": [g.get_state() for g in self.rngs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, o, sched, g, ms, os_, ss, gs in zip(
            self.stacked.singles, self.opts, self.scheds, self.rngs, state["models"],
            state["opts"], state["scheds"], state["rngs"], strict=True,
        ):  # fmt: skip
            m.load_state_dict(ms)
            o.load_state_dict(os_)
            sched.load_state_dict(ss)
            g.set_state(gs)

    def _clip(self, i: int) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.stacked.singles[i].parameters(), self.clip)

    def step(self, it: int, active: torch.Tensor, x: torch.Tensor, forward) -> list[float]:
        lrs = []
        for i, (o, sched) in enumerate(zip(self.opts, self.scheds, strict=True)):
            lrs.append(sched.get_last_lr()[0])
            if active[i]:
                self._clip(i)
                o.step()
        if self.every and it % self.every == self.every - 1:
            self._hessian(active, x, forward)
        for i, sched in enumerate(self.scheds):
            if active[i]:
                sched.step()
        return lrs

    def _hessian(self, active: torch.Tensor, x: torch.Tensor, forward) -> None:
        """train.update_hessian for every active run at once: labels sampled from each
        run's own predictions with uniforms from its own RNG stream."""
        k = self.stacked.k
        u = torch.stack([torch.rand(x.shape[1:], generator=g) for g in self.rngs]).to(x.device)
        self.zero_grad()
        logits = forward(x).float()
        flat = logits.reshape(k, -1, logits.size(-1))
        cdf = torch.softmax(flat.detach(), dim=-1).cumsum(-1)
        sampled = torch.searchsorted(cdf, u.reshape(k, -1, 1) * cdf[..., -1:]).squeeze(-1)
        sampled = sampled.clamp_(max=flat.size(-1) - 1)
        per = F.cross_entropy(flat.reshape(-1, flat.size(-1)), sampled.reshape(-1),
                              reduction="none").view(k, -1).mean(1)  # fmt: skip
        per.masked_fill(~active.to(per.device), 0.0).sum().backward()
        for i, o in enumerate(self.opts):
            if active[i]:
                self._clip(i)
                o.update_hessian()
        self.zero_grad()


def train_stacked(
    cfgs: Sequence[Any], log=None, *, mode: str = "auto", checkpoint: str | Path | None = None
) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (RunConfigs, ``check_stackable``) as one stack; return and
    write (``out_dir/result.json``, and ``model.pt`` for an ``ok`` run) each run's result,
    as ``train.run`` would: its own init (``train.seed``), training and eval batches, LR
    schedule, loss ceiling, divergence, patience and grad clipping. A diverged or stopped run
    is masked out (its weights stay) while the others go on. Each result's ``wall_time`` is
    the stack's divided by K (the compute is shared).

    ``checkpoint``: a file the stack saves itself to at every eval (or
    ``train.checkpoint_interval``) and resumes from, bit for bit, when it exists and holds
    the same runs; deleted once every result is written. Without it a killed stack starts
    over.

    ``mode``: ``"slices"`` steps the stacked tensors with one LR-linear optimizer
    (``SliceLR``: AdamW, Adam, Lion, SGD, ADOPT; NotBatchable for any other), ``"runs"``
    steps each run's own optimizer on its own model (every optimizer), ``"auto"`` slices
    when the optimizer allows it."""
    import math
    import time

    from .data import load_dataset
    from .fileio import save_torch, write_json
    from .train import RESULT, WEIGHTS, _autocast, build_model, build_run_optimizer, eval_generator

    if mode not in ("auto", "slices", "runs"):
        raise ValueError(f"mode must be auto, slices or runs, got {mode!r}")
    check_stackable(cfgs)
    k = len(cfgs)
    c0, t0 = cfgs[0], cfgs[0].train
    device = torch.device(t0.device)
    data = load_dataset(c0.data.path or None, vocab_size=c0.data.vocab_size or None)
    singles, opts, rngs = [], [], []
    for cfg in cfgs:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, data.vocab_size).to(device)
        singles.append(model)
        opts.append(build_run_optimizer(cfg, model))
        rngs.append(torch.Generator().set_state(torch.get_rng_state()))
    steps: _SliceSteps | _RunSteps | None = None
    if mode in ("auto", "slices"):
        try:  # one LR-linear optimizer with the runs' shared options, or NotBatchable
            stacked = stack(singles).to(device)
            steps = _SliceSteps(stacked, opts, cfgs)
        except NotBatchable:
            if mode == "slices":
                raise
    if steps is None:
        stacked = stack(singles, leaves=True).to(device)
        steps = _RunSteps(stacked, opts, cfgs, rngs)
    del singles, opts
    gens = [torch.Generator().manual_seed(cfg.train.seed) for cfg in cfgs]
    ceilings = [cfg.train.loss_ceiling or 2.0 * math.log(data.vocab_size) for cfg in cfgs]
    active = torch.ones(k, dtype=torch.bool)
    hist = [{"train_loss": [], "lr": [], "val": [], "win_rate": []} for _ in cfgs]
    best = [(math.inf, 0) for _ in cfgs]
    status, stop, diverged_at = ["ok"] * k, ["max_iters"] * k, [None] * k
    iters = [0] * k
    block, bs = c0.model.block_size, t0.batch_size

    def forward(x: torch.Tensor) -> torch.Tensor:
        with _autocast(c0):
            return stacked(x.to(device))

    def losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = forward(x)
        flat = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                               y.to(device).reshape(-1), reduction="none")  # fmt: skip
        return flat.view(k, -1).mean(1)

    def evaluate() -> list[float]:
        egens = [eval_generator(cfg) for cfg in cfgs]
        total = torch.zeros(k, dtype=torch.float64)
        stacked.eval()
        with torch.no_grad():
            for _ in range(t0.eval_iters):
                xy = [data.get_batch("val", bs, block, g) for g in egens]
                total += (
                    losses(torch.stack([a for a, _ in xy]), torch.stack([b for _, b in xy]))
                    .double()
                    .cpu()
                )
        stacked.train()
        return (total / t0.eval_iters).tolist()

    names = [str(cfg.train.out_dir) for cfg in cfgs]
    first, elapsed0 = 0, 0.0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        saved = _load_stack(ckpt_path)
        if saved.get("runs") == names:
            steps.load_state_dict(saved["steps"])
            for g, state in zip(gens, saved["gens"], strict=True):
                g.set_state(state)
            active = saved["active"].clone()
            hist, best, status, stop = saved["hist"], saved["best"], saved["status"], saved["stop"]
            diverged_at, iters = saved["diverged_at"], saved["iters"]
            first, elapsed0 = saved["it"], saved["elapsed"]
    ckpt_every = t0.checkpoint_interval or t0.eval_interval

    def save(done: int) -> None:
        _save_stack(ckpt_path, {
            "format": _STACK_FORMAT, "runs": names, "it": done, "steps": steps.state_dict(),
            "gens": [g.get_state() for g in gens], "active": active.clone(), "hist": hist,
            "best": best, "status": status, "stop": stop, "diverged_at": diverged_at,
            "iters": iters, "elapsed": elapsed0 + time.perf_counter() - start,
        })  # fmt: skip

    start = time.perf_counter()
    stacked.train()
    for it in range(first, t0.max_iters):
        if not active.any():
            break
        xy = [data.get_batch("train", bs, block, g) for g in gens]
        x, y = torch.stack([a for a, _ in xy]), torch.stack([b for _, b in xy])
        steps.zero_grad()
        per_run = losses(x, y)
        values = per_run.detach().double().cpu().tolist()
        for i in range(k):
            if active[i] and (not math.isfinite(values[i]) or values[i] > ceilings[i]):
                status[i] = stop[i] = "diverged"
                diverged_at[i], active[i] = it, False
        if not active.any():
            break
        per_run.masked_fill(~active.to(per_run.device), 0.0).sum().backward()
        lrs = steps.step(it, active, x, forward)
        done = it + 1
        for i in range(k):
            if active[i]:
                iters[i] = done
                hist[i]["lr"].append(lrs[i])
                hist[i]["train_loss"].append(values[i])
        if done % t0.eval_interval == 0 or done == t0.max_iters:
            vals = evaluate()
            for i in range(k):
                if not active[i]:
                    continue
                hist[i]["val"].append([done, vals[i]])
                if isinstance(steps, _RunSteps) and steps.every:
                    hist[i]["win_rate"].append([done, steps.opts[i].last_win_rate])
                if vals[i] < best[i][0]:
                    best[i] = (vals[i], done)
                if not math.isfinite(vals[i]) or vals[i] > ceilings[i]:
                    status[i] = stop[i] = "diverged"
                    diverged_at[i], active[i] = done, False
                elif cfgs[i].train.patience and done - best[i][1] >= cfgs[i].train.patience:
                    stop[i], active[i] = "early_stop", False
        if ckpt_path is not None and done % ckpt_every == 0 and done < t0.max_iters:
            save(done)
    elapsed = elapsed0 + time.perf_counter() - start
    results = []
    num_params = sum(q.numel() for q in stacked.run_state(0).values())
    for i, cfg in enumerate(cfgs):
        out = Path(cfg.train.out_dir)
        tail = hist[i]["train_loss"][-min(len(hist[i]["train_loss"]), cfg.train.eval_interval) :]
        final_val = hist[i]["val"][-1][1] if hist[i]["val"] else None
        result = {
            "status": status[i],
            "stop_reason": stop[i],
            "iters": iters[i],
            "best_val_loss": best[i][0] if math.isfinite(best[i][0]) else None,
            "best_iter": best[i][1],
            "final_val_loss": final_val
            if final_val is not None and math.isfinite(final_val)
            else None,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "diverged_at": diverged_at[i],
            "tokens": iters[i] * cfg.train.batch_size * cfg.model.block_size,
            "wall_time": elapsed / k,
            "num_params": num_params,
            "data": data.source,
            "config": cfg.to_dict(),
            "history": hist[i],
            "stacked": k,
        }
        if status[i] == "ok":
            save_torch(out / WEIGHTS, stacked.run_state(i))
        write_json(out / RESULT, result)
        results.append(result)
    if ckpt_path is not None:
        ckpt_path.unlink(missing_ok=True)
    return results


_STACK_FORMAT = "smup-stack-1"


def _save_stack(path: Path, state: dict[str, Any]) -> None:
    from .fileio import save_torch

    save_torch(path, state)


def _load_stack(path: Path) -> dict[str, Any]:
    """A stack checkpoint; an unreadable or foreign file is ignored (the stack starts over)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for bad files
        return {}
    return state if isinstance(state, dict) and state.get("format") == _STACK_FORMAT else {}


@torch.no_grad()
def _clip_per_run(stacked: Stacked, max_norm: float, active: torch.Tensor) -> None:
    """torch's clip_grad_norm_ for each run alone: its gradients × min(1, max/(‖g‖+1e-6))."""
    grads = [q.grad for q in stacked.parameters() if q.grad is not None]
    if not grads:
        return
    sq = sum(g.double().pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))))
