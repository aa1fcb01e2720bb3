"""The optimizer records (spectral_mup/optim/registry.py): each record's capabilities agree
with its class, every option has an [optim] config key, and one normaliser names options."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from spectral_mup import ConfigError, Parametrization, build_optimizer, rules
from spectral_mup.config import OptimSection, _coerce, build_config
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import (
    REGISTRY,
    get_spec,
    normalize_options,
    record_for_class,
    resolve_rule,
    split_options,
)
from spectral_mup.train import run_optimizer_options

CFG = GPTConfig(width=32, depth=1, n_heads=2, vocab_size=65, block_size=8)
P = Parametrization(kind="mup", base_width=16, base_depth=1)
F64 = torch.float64
TORCH_BY_PATH = ["torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD", "torch.optim.RAdam"]


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG, P)


def test_records_name_their_rules_and_are_the_rules_view():
    for name, record in REGISTRY.items():
        assert record.name == name and record.rule.name == name
        assert rules.OPTIMIZER_RULES[name] is record.rule
        assert rules.rule_for(name) is record.rule
    assert set(rules.OPTIMIZER_RULES) == set(REGISTRY)


def test_every_option_is_an_optim_config_key_of_its_type():
    """A record whose option has no [optim] key (its ε counts as ``eps``) fails here, and so
    does an [optim] option key that no optimizer has."""
    types = typing.get_type_hints(OptimSection)
    used = set()
    for name, record in REGISTRY.items():
        for key in record.config_keys():
            assert key in types, f"{name}: option {key!r} has no [optim] key in OptimSection"
            default = record.defaults[record.eps_key if key == "eps" else key]
            _coerce(f"optim.{key}", default, types[key])  # its default is of the key's type
            used.add(key)
    general = {"name", "lr", "weight_decay", "decay_vectors", "spectral_normalize"}
    assert set(types) - general == used


@pytest.mark.parametrize("name", sorted(REGISTRY) + TORCH_BY_PATH)
def test_options_are_constructor_arguments(name):
    """Every option but the AdamW part's (build_optimizer's) goes to the class, ε included."""
    record = get_spec(name)
    params = inspect.signature(record.cls.__init__).parameters
    aux = {record.aux.lr, record.aux.weight_decay} if record.aux else set()
    assert set(record.defaults) - aux <= set(params)
    assert record.eps_key is None or record.eps_key in params


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_curvature_estimate_agrees_with_the_class(name):
    """A record with a curvature estimate: the class has ``update_hessian``, keeps its
    interval option as an attribute (through SpectralNormalized too) and takes the
    tokens-per-step option; one without: no ``update_hessian``, interval 0."""
    record = REGISTRY[name]
    opt = build_optimizer(name, model(), P, lr=1e-3)
    curvature = record.curvature
    if curvature is None:
        assert not hasattr(record.cls, "update_hessian")
        assert record.curvature_interval(opt) == 0
        return
    assert callable(record.cls.update_hessian)
    assert record.curvature_interval(opt) == record.defaults[curvature.interval]
    for spectral in (False, True):
        options = {curvature.interval: 3, curvature.tokens: 77}
        opt = build_optimizer(name, model(), P, lr=1e-3, spectral_normalize=spectral, **options)
        assert record.curvature_interval(opt) == 3
        assert all(g[curvature.tokens] == 77 for g in opt.param_groups)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_aux_part_agrees_with_the_rule_and_build_optimizer(name):
    """An AdamW part: its LR and decay options set exactly the groups of the rule's
    auxiliary roles (build_optimizer's options, not the class's); without one, none."""
    record = REGISTRY[name]
    if record.aux is None:
        assert not record.rule.auxiliary
        assert not any(g.get("aux") for g in build_optimizer(name, model(), P, 1e-3).param_groups)
        return
    assert record.rule.auxiliary
    params = inspect.signature(record.cls.__init__).parameters
    assert record.aux.lr not in params and record.aux.weight_decay not in params

    def groups(aux_lr, aux_wd):
        options = {record.aux.lr: aux_lr, record.aux.weight_decay: aux_wd}
        opt = build_optimizer(name, model(), P, 1e-3, 0.1, **options)
        return {tuple(g["names"]): g for g in opt.param_groups}

    a, b = groups(2e-3, 0.0), groups(4e-3, 0.2)
    assert a.keys() == b.keys()
    assert any(g.get("aux") for g in a.values())
    for key, g in a.items():
        if g.get("aux"):
            assert g["role"] in record.rule.auxiliary
            assert b[key]["lr"] == pytest.approx(2 * g["lr"])
            if g["role"] != "vector":  # vectors are not decayed
                assert g["weight_decay"] == 0 < b[key]["weight_decay"]
        else:
            assert (b[key]["lr"], b[key]["weight_decay"]) == (g["lr"], g["weight_decay"])
    with pytest.raises(ConfigError, match=f"{record.aux.lr} must be > 0"):
        groups(0.0, 0.0)


STACKED = sorted(n for n, r in REGISTRY.items() if r.stacking) + TORCH_BY_PATH[:3]
# its defaults, and the other value of an option that picks the decay (ADOPT's decouple)
CASES = [(n, None) for n in STACKED]
CASES += [(n, False) for n in STACKED if get_spec(n).stacking.decoupled_by]


@pytest.mark.parametrize(("name", "decouple"), CASES)
def test_stacking_describes_the_class_weight_decay(name, decouple):
    """What batched.SliceLR assumes of a stackable optimizer, checked on the class for 3
    steps in float64: with decay λ it steps like the optimizer without decay on λ·p added
    to the gradient ("l2"), or with p·(1 − lr·λ) first ("decoupled"; not at the first step
    where ``first_decay`` is false). ``decouple`` False: ADOPT's coupled variant."""
    record = get_spec(name)
    options = dict(record.defaults)
    if decouple is not None:
        options[record.stacking.decoupled_by] = decouple
    decay, first_decay = record.stacking.mode(options)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=gen, dtype=F64)
    grads = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(3)]
    lr, lam = 0.05, 0.5
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a = record.cls([a], lr=lr, weight_decay=lam, **options)
    opt_b = record.cls([b], lr=lr, weight_decay=0.0, **options)
    for step, g in enumerate(grads, start=1):
        a.grad = g.clone()
        b.grad = g + lam * b.detach() if decay == "l2" else g.clone()
        if decay == "decoupled" and (first_decay or step > 1):
            with torch.no_grad():
                b.mul_(1 - lr * lam)
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(a, start)


def test_records_of_imported_classes():
    """A class given by import path: options and ε from its signature, no rule, AdamW part or
    curvature estimate; stacked only as torch's AdamW (decoupled), Adam or SGD (l2)."""
    radam = get_spec("torch.optim.RAdam")
    assert radam.rule is None and radam.aux is None and radam.curvature is None
    assert radam.stacking is None and radam.coord_lr == 1e-3 and radam.eps_key == "eps"
    modes = {n: get_spec(n).stacking.mode({}) for n in TORCH_BY_PATH[:3]}
    assert modes == {
        "torch.optim.Adam": ("l2", True),
        "torch.optim.AdamW": ("decoupled", True),
        "torch.optim.SGD": ("l2", True),
    }
    assert record_for_class(torch.optim.AdamW) is REGISTRY["adamw"]
    assert record_for_class(torch.optim.Adam).stacking.mode({}) == ("l2", True)
    assert record_for_class(torch.optim.RAdam).stacking is None
    assert REGISTRY["adopt"].stacking.mode({"decouple": True}) == ("decoupled", False)
    assert REGISTRY["adopt"].stacking.mode({"decouple": False}) == ("l2", False)
    assert REGISTRY["muon"].stacking is None


def test_an_imported_class_with_a_curvature_estimate_keeps_it():
    """A class by import path that keeps a curvature estimate as the training loop expects
    (``update_hessian`` and a ``hessian_interval`` option; SophiaG's contract) gets one:
    the loop refreshes it and fills its tokens per step, as for the registered Sophia."""
    record = get_spec("spectral_mup.optim.SophiaG")
    assert record.rule is None and record.curvature == REGISTRY["sophia"].curvature
    assert get_spec("torch.optim.Adam").curvature is None  # no update_hessian
    cfg = build_config({"optim": {"name": "spectral_mup.optim.SophiaG", "rho": 0.1},
                        "train": {"batch_size": 4}, "model": {"block_size": 8}})  # fmt: skip
    assert run_optimizer_options(cfg) == {"rho": 0.1, "bs": 32}


def test_normalize_options_names_eps_and_checks_keys():
    shampoo = REGISTRY["shampoo"]
    assert normalize_options("shampoo", {"eps": 1e-9}) == {"epsilon": 1e-9}
    assert normalize_options(shampoo, {"eps": 1e-9}, defaults=True) == {
        **shampoo.defaults,
        "epsilon": 1e-9,
    }
    options, eps = split_options("shampoo", {"eps": 1e-9, "grafting": "adam"})
    assert eps == 1e-9 and "epsilon" not in options and options["grafting"] == "adam"
    assert split_options("lion", {}) == (REGISTRY["lion"].defaults, None)
    assert normalize_options("lion", {"eps": 1.0}) == {"eps": 1.0}  # the class rejects it
    with pytest.raises(ConfigError, match=r"^lion: eps, foo; known betas$"):
        normalize_options("lion", {"foo": 1, "eps": 1.0}, unknown="lion: {keys}; known {options}")
    assert normalize_options("sgd", {"momentum": 0.5}, unknown="{keys}") == {"momentum": 0.5}


def test_run_optimizer_options_from_the_records():
    """[optim] keys of the run's optimizer (its ε under its own name) and, for an optimizer
    with a curvature estimate, the tokens per step."""
    shampoo = build_config({"optim": {"name": "shampoo", "eps": 1e-10, "rho": 0.1}})
    assert run_optimizer_options(shampoo) == {"epsilon": 1e-10}
    sophia = build_config({"optim": {"name": "sophia", "rho": 0.1, "eps": 1e-3}})
    tokens = sophia.train.batch_size * sophia.model.block_size
    assert run_optimizer_options(sophia) == {"rho": 0.1, "bs": tokens}


def test_swapped_rules_reach_build_optimizer(monkeypatch):
    """The rules view and the family helpers are read when a rule is resolved, so a test
    that swaps one (tests/test_coord.py's negative controls) changes the rule applied."""
    paper = rules.one_family("spectral_normalized", "constant LR")
    monkeypatch.setitem(rules.OPTIMIZER_RULES, "lamb", paper)
    assert resolve_rule("lamb") is paper
    monkeypatch.setattr(rules, "soap_family", lambda b: rules.FAMILIES["orthogonalized"])
    assert resolve_rule("soap", block_size=0).family("hidden") is rules.ORTHOGONALIZED
    monkeypatch.setattr(rules, "grafted_family", lambda block_size: rules.ENTRYWISE)
    assert resolve_rule("shampoo", grafting="adam").family("hidden") is rules.ENTRYWISE
