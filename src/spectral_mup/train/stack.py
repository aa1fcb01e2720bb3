"""K models of one shape stacked into one model (issue 13: batched sweeps).

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
``tests/test_batched.py`` checks both against K separate models and optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SmupError
from ..models.common import PerRun


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
