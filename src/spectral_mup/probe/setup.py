"""What a probe trains: ``probe``'s arguments checked and turned into a model builder, an
optimizer maker and the training batches (``ProbeSetup``), and the knobs that vary between
its trajectories (``Run``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import rules
from ..data import Dataset, load_dataset
from ..errors import ConfigError
from ..models import build_model, config_class
from ..optim import OptimizerRecord, build_optimizer, get_spec, normalize_options, optimizer_key
from ..parametrize import Parametrization, smup_attr
from ..train import loss_fn, update_hessian

Batch = tuple[torch.Tensor, torch.Tensor]
ModelFactory = Callable[[int, int, Parametrization], nn.Module]


@dataclass
class Run:
    """Knobs of one short trajectory at one size."""

    eps: float | None = None  # the optimizer's ε (absolute; None: its default)
    grad_scale: float = 1.0
    weight_decay: float = 0.0
    weight_scale: float = 1.0  # every matrix × this at init
    keep: bool = False  # keep the updates themselves (weight decay test)
    skip: int = 0  # steps taken before the measured ones (the optimizer's transient)


@dataclass
class ProbeSetup:
    """One probe's optimizer, model and data (``probe``'s arguments, checked: ``create``)."""

    name: str  # the optimizer's key (optim.optimizer_key)
    spec: OptimizerRecord
    options: dict[str, Any]  # as given, ε under the optimizer's own name
    run_options: dict[str, Any]  # what every trajectory builds the optimizer with
    unit: rules.OptimizerRule  # every LR multiplier 1
    widths: list[int]  # sorted; the first is the base width
    depths: list[int]  # sorted; empty: no depth runs
    seeds: Sequence[int]
    steps: int
    skip: int
    lr: float
    spectral_normalize: bool
    dtype: torch.dtype
    factory: ModelFactory  # (width, depth, p) -> the model, with roles
    model_name: str  # a bundled arch, or the factory's name
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    hessian: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None]
    probe_x: torch.Tensor  # the probe batch's inputs
    batches: list[Batch] | None  # the caller's; None: drawn from ``dataset`` per seed
    dataset: Dataset | None = None
    batch_size: int = 4
    block_size: int = 32

    @property
    def depth0(self) -> int:
        """The depth of the width runs (and the base depth)."""
        return self.depths[0] if self.depths else 2

    @classmethod
    def create(
        cls,
        optimizer: str | type[torch.optim.Optimizer],
        options: Mapping[str, Any] | None,
        *,
        widths: Sequence[int],
        depths: Sequence[int],
        seeds: Sequence[int],
        steps: int,
        skip: int,
        lr: float,
        arch: str,
        n_heads: int,
        batch_size: int,
        block_size: int,
        data: str | None,
        model: ModelFactory | None,
        batches: Sequence[Batch] | None,
        loss: Callable | None,
        hessian: Callable | None,
        spectral_normalize: bool,
        dtype: torch.dtype,
    ) -> ProbeSetup:
        """``probe``'s arguments checked (a ConfigError names the first that is wrong), sizes
        sorted, data loaded and the model factory chosen (``probe`` says what each means)."""
        name, spec, options = _optimizer(optimizer, options)
        _check_sizes(widths, steps, skip, lr)
        widths, depths = sorted(set(int(w) for w in widths)), sorted(set(int(d) for d in depths))
        if len(depths) == 1:
            depths = []
        run_options, unit = _run_options(name, spec, options, lr)
        n_steps = skip + steps
        batches, dataset, probe_x = _data(batches, data, batch_size, block_size, n_steps, dtype)
        if model is None:
            config_cls = config_class(arch)
            if dataset is not None:
                vocab = dataset.vocab_size
            else:
                vocab = 1 + max(int(t.max()) for b in batches for t in b)
            factory = functools.partial(_bundled, config_cls, n_heads, vocab, block_size)
            model_name = arch
        else:
            factory, model_name = model, getattr(model, "__qualname__", type(model).__name__)
        return cls(
            name, spec, options, run_options, unit, widths, depths, tuple(seeds), steps, skip,
            lr, spectral_normalize, dtype, factory, model_name, loss or loss_fn,
            hessian or update_hessian, probe_x, batches, dataset, batch_size, block_size,
        )  # fmt: skip

    def build(self, width: int, depth: int, p: Parametrization, seed: int) -> nn.Module:
        """The model at ``width`` × ``depth`` under ``p``, initialized from seed ``seed``, in
        the probe's dtype."""
        torch.manual_seed(seed)
        built = self.factory(width, depth, p)
        if smup_attr(built, "smup_roles") is None:
            raise ConfigError(
                f"the probe's model {self.model_name} returned a model without roles: build it "
                "with the Parametrization it is given, or call spectral_mup.parametrize("
                "model, p, base=...) on it"
            )
        return built.to(self.dtype)

    def make_optimizer(
        self, model: nn.Module, run: Run, p: Parametrization
    ) -> torch.optim.Optimizer:
        """The probed optimizer over ``model`` at the probe's LR, every μP LR multiplier 1,
        with ``run``'s ε and weight decay."""
        kw = dict(self.run_options)
        if run.eps is not None:
            kw["eps"] = run.eps
        if self.spec.aux is not None:
            kw[self.spec.aux.weight_decay] = run.weight_decay
        return build_optimizer(self.name, model, p, self.lr, run.weight_decay, rule=self.unit,
                               spectral_normalize=self.spectral_normalize, **kw)  # fmt: skip

    def batches_for(self, seed: int) -> list[Batch]:
        """The training batches of seed ``seed``'s trajectories: the caller's, else
        ``skip + steps`` Tiny Shakespeare (or ``data``) batches drawn for the seed."""
        if self.batches is not None:
            return self.batches
        gen = torch.Generator().manual_seed(1000 + seed)
        return [
            self.dataset.get_batch("train", self.batch_size, self.block_size, gen)
            for _ in range(self.skip + self.steps)
        ]


def _optimizer(
    optimizer: str | type[torch.optim.Optimizer], options: Mapping[str, Any] | None
) -> tuple[str, OptimizerRecord, dict[str, Any]]:
    """The optimizer's key, spec and options (``eps`` renamed to its ε's own name), checked."""
    name = (
        optimizer
        if isinstance(optimizer, str)
        else f"{optimizer.__module__}.{optimizer.__qualname__}"
    )
    spec = get_spec(name)
    name = optimizer_key(name)
    unknown = f"{name} has no option(s) {{keys}}; its options: {{options}}"
    return name, spec, normalize_options(spec, options or {}, unknown=unknown)


def _check_sizes(widths: Sequence[int], steps: int, skip: int, lr: float) -> None:
    if len(set(widths)) < 2 or any(int(w) <= 0 for w in widths):
        raise ConfigError(
            f"the probe needs at least two different positive widths, got {list(widths)}"
        )
    if steps < 2 or skip < 0 or not lr > 0:
        raise ConfigError(
            f"the probe needs steps >= 2, skip >= 0 and lr > 0; got {steps}, {skip}, {lr}"
        )


def _run_options(
    name: str, spec: OptimizerRecord, options: dict[str, Any], lr: float
) -> tuple[dict[str, Any], rules.OptimizerRule]:
    """The options every trajectory builds the optimizer with, and the rule it is built
    under: every LR multiplier 1."""
    run_options = {**options}
    if spec.curvature is not None:  # Sophia: refresh the estimate every step
        run_options.setdefault(spec.curvature.interval, 1)
    aux_roles = rules.rule_for(name).auxiliary if name in rules.OPTIMIZER_RULES else ()
    if spec.aux is not None:  # the AdamW part moves at the same unit LR
        run_options[spec.aux.lr] = lr
    # every LR multiplier 1 under μP's init and forward multipliers: N = sqrt(fo/fi) for all
    unit = rules.OptimizerRule(
        "probe", {"*": rules.FAMILIES["spectral_normalized"]}, eps=None, auxiliary=aux_roles
    )
    return run_options, unit


def _data(
    batches: Sequence[Batch] | None,
    data: str | None,
    batch_size: int,
    block_size: int,
    n_steps: int,
    dtype: torch.dtype,
) -> tuple[list[Batch] | None, Dataset | None, torch.Tensor]:
    """The caller's batches (floating inputs in the probe's dtype; at least ``n_steps``), or
    else the dataset ``data`` (Tiny Shakespeare by default); and the probe batch's inputs."""
    if batches is not None:
        batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
        if len(batches) < n_steps:
            raise ConfigError(
                f"the probe takes {n_steps} steps (skip + steps) but got {len(batches)} "
                "batches; pass more or lower steps/skip"
            )
        return batches, None, batches[0][0]
    dataset = load_dataset(data)
    gen = torch.Generator().manual_seed(7)
    return None, dataset, dataset.get_batch("val", batch_size, block_size, gen)[0]


def _bundled(
    config_cls: type, n_heads: int, vocab_size: int, block_size: int, width: int, depth: int,
    p: Parametrization,
) -> nn.Module:  # fmt: skip
    """The bundled model of ``config_cls``'s architecture at ``width`` × ``depth``."""
    cfg = config_cls(width=width, depth=depth, n_heads=n_heads, vocab_size=vocab_size,
                     block_size=block_size)  # fmt: skip
    return build_model(cfg, p)
