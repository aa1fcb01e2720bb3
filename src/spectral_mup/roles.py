"""Role inference: which dimensions of each parameter grow with width, and which live in
residual blocks that repeat with depth.

The idea is microsoft/mup's base shapes: build the same model at two widths and compare
parameter shapes. Here the result is a plain ``dict`` keyed by parameter name — no
metadata on tensors, so wrappers (torch.compile, DDP, FSDP) cannot drop it.

Fans come from the layer type, never from the order of a tensor's dimensions (RULES.md §3,
"Transposed storage"). Layouts: ``nn.Linear``/``nn.ConvNd``/``nn.Bilinear`` weights and
``nn.MultiheadAttention``'s input projections are ``"linear"`` ``(fan_out, fan_in, ...)``;
``nn.Embedding`` weights are ``"embedding"`` ``(num_embeddings, dim)`` = ``(fan_in, fan_out)``
(one-hot input, RULES.md §1); GPT-2's ``Conv1D`` (any module class named ``Conv1D`` with an
``nf`` attribute, as in ``transformers``) is ``"transposed"`` ``(fan_in, fan_out)``. Register
another layer type with ``register_layout`` or name a parameter's layout in ``layouts=``.
A matrix of any other module whose fans cannot be told apart is an error that names the
``overrides``/``layouts`` entry to add.

Tied weights (one ``Parameter`` reached under two names, e.g. a GPT-2 head tied to the token
embedding) have one entry, under the name ``named_parameters()`` gives, with the embedding's
(input) role and the readout module's name in ``tied_readout``; ``parametrize`` applies the
readout multiplier in that module's forward pass (microsoft/mup's ``MuSharedReadout``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError
from .fileio import write_json
from .rules import ROLES, Role

Layout = Literal["linear", "embedding", "transposed"]
LAYOUTS: tuple[str, ...] = ("linear", "embedding", "transposed")

# module type → {parameter name: layout}; extend with ``register_layout``
_LAYOUT_REGISTRY: dict[type, dict[str, str]] = {
    nn.Linear: {"weight": "linear"},
    nn.Bilinear: {"weight": "linear"},
    nn.Conv1d: {"weight": "linear"},
    nn.Conv2d: {"weight": "linear"},
    nn.Conv3d: {"weight": "linear"},
    nn.Embedding: {"weight": "embedding"},
    nn.EmbeddingBag: {"weight": "embedding"},
    nn.MultiheadAttention: {
        f"{w}_weight": "linear" for w in ("in_proj", "q_proj", "k_proj", "v_proj")
    },
}

# attributes under which wrappers hold the user's module (torch.compile, DDP, FSDP1,
# activation checkpointing); their names prefix the parameter names
WRAPPER_ATTRS = ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_PREFIXES = tuple(f"{a}." for a in WRAPPER_ATTRS)


@dataclass(frozen=True)
class ParamRole:
    """How one parameter scales. ``fan_in``/``fan_out``: its layer's fans (a vector is a
    fan_in = 1 matrix); ``m_in``/``m_out``: the fans relative to the base model;
    ``m_depth``: number of blocks relative to the base (1 outside blocks)."""

    role: Role
    m_in: float = 1.0
    m_out: float = 1.0
    in_block: bool = False
    m_depth: float = 1.0
    fan_in: int = 1
    fan_out: int = 1
    transposed: bool = False
    """The weight is stored ``(fan_in, fan_out)`` (GPT-2's ``Conv1D``); optimizers that
    treat a matrix as an operator (Muon, spectral normalization) transpose it first."""
    tied_readout: str | None = None
    """Name of the module that also uses this tensor as its readout weight (a tied head)."""

    @property
    def width_mult(self) -> float:
        """The multiplier of the dimension that grows (fan_in for the readout, else fan_out)."""
        return self.m_in if self.role == "output" else self.m_out


def canonical_name(name: str) -> str:
    """Parameter name with wrapper prefixes (torch.compile, DDP, FSDP1) removed."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._fsdp_wrapped_module.", ".").replace(
            "._checkpoint_wrapped_module.", "."
        )
    return name


def _template(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def register_layout(module_type: type, layout: Layout, param: str = "weight") -> None:
    """Declare how ``module_type`` stores its ``param``: ``"linear"`` (fan_out, fan_in, ...),
    ``"embedding"`` (vocabulary, dim) or ``"transposed"`` (fan_in, fan_out)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    _LAYOUT_REGISTRY.setdefault(module_type, {})[param] = layout


def module_layout(module: nn.Module, p_name: str) -> str:
    """How ``module`` stores its parameter ``p_name``: a layout or ``"unknown"``."""
    for cls in type(module).__mro__:
        if p_name in _LAYOUT_REGISTRY.get(cls, {}):
            return _LAYOUT_REGISTRY[cls][p_name]
    if p_name == "weight" and type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "transposed"  # transformers.pytorch_utils.Conv1D: weight (nx, nf)
    return "unknown"


def _layouts(model: nn.Module, overrides: Mapping[str, str]) -> dict[str, str]:
    """Layout of every parameter occurrence (tied tensors appear under each name)."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            full = canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            forced = [v for pat, v in overrides.items() if fnmatch.fnmatchcase(full, pat)]
            out.setdefault(full, forced[0] if forced else module_layout(module, p_name))
    return out


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Name ``named_parameters()`` gives → the other names of the same tensor (ties)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(canonical_name(name))
    return {ns[0]: ns[1:] for ns in names.values() if len(ns) > 1}


Shapes = Mapping[str, torch.Size | tuple[int, ...]]
SHAPES_FORMAT = "spectral-mup-shapes-v1"


def save_shapes(
    path: str | Path, base: nn.Module | Shapes, delta: nn.Module | Shapes | None = None
) -> Path:
    """Write the parameter shapes of the base model (and of the delta model) to a JSON file
    — microsoft/mup's ``.bsh`` — so that the training job can infer roles with
    ``infer_roles(model, base=path)`` (or ``parametrize(model, p, base=path)``) without
    importing or building the base model. Build ``base``/``delta`` on the ``meta`` device:
    only shapes and names are read. Returns the path."""
    doc = {"format": SHAPES_FORMAT, "base": _listed(base)}
    if delta is not None:
        doc["delta"] = _listed(delta)
    return write_json(path, doc)


def load_shapes(path: str | Path) -> tuple[dict[str, tuple], dict[str, tuple] | None]:
    """The ``(base, delta)`` shapes of a file written by :func:`save_shapes` (``delta`` is
    ``None`` when the file has none); a missing or foreign file is a one-line error."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"shapes file {path} does not exist; write it with save_shapes") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"shapes file {path} is not readable JSON ({exc}); rewrite it") from None
    if not isinstance(doc, dict) or doc.get("format") != SHAPES_FORMAT:
        raise ConfigError(
            f"{path} is not a spectral-mup shapes file (format {SHAPES_FORMAT!r}); "
            "write it with spectral_mup.save_shapes"
        )

    def shapes(key: str) -> dict[str, tuple] | None:
        table = doc.get(key)
        if table is None:
            return None
        if not isinstance(table, dict) or not all(
            isinstance(s, list) and all(isinstance(d, int) for d in s) for s in table.values()
        ):
            raise ConfigError(f"{path}: {key!r} must map parameter names to lists of ints")
        return {name: tuple(s) for name, s in table.items()}

    base = shapes("base")
    if not base:
        raise ConfigError(f"{path} has no 'base' shapes; write it with save_shapes(path, base)")
    return base, shapes("delta")


def _listed(model: nn.Module | Shapes) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in _shapes(model).items()}


def _shapes(model: nn.Module | Shapes) -> dict[str, tuple]:
    if isinstance(model, nn.Module):
        return {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    return {canonical_name(n): tuple(s) for n, s in model.items()}


def infer_roles(
    model: nn.Module,
    base: nn.Module | Shapes | str | os.PathLike,
    delta: nn.Module | Shapes | None = None,
    *,
    overrides: Mapping[str, Role] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, ParamRole]:
    """Classify every parameter of ``model``.

    Args:
        model: the model to train.
        base: the same architecture at the base width and base depth: a module (build it
            on the ``meta`` device to make it free), a name → shape mapping, or the path of
            a file written by :func:`save_shapes` (whose delta shapes are used unless
            ``delta`` is given).
        delta: the same architecture at another width (and, optionally, another depth);
            needed when ``model`` has the base width. Dimensions that differ between
            ``base`` and ``delta`` (or ``model``) grow with width.
        overrides: glob pattern → role, for parameters that cannot be inferred.
        layouts: glob pattern → ``"linear"``, ``"embedding"`` or ``"transposed"``: how a
            custom layer stores its weight (see ``register_layout``).

    Parameters whose names exist only at some depths (indices of a repeated block, e.g.
    ``blocks.3.mlp.c_fc.weight``) mark their block template ``blocks.*.mlp.c_fc.weight``;
    every parameter matching such a template is ``in_block`` and its ``m_depth`` is the
    ratio of its template's count in ``model`` to that in ``base``.
    """
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise ConfigError(f"override {pattern!r}: unknown role {role!r} (use one of {ROLES})")
    layouts = dict(layouts or {})
    for pattern, layout in layouts.items():
        if layout not in LAYOUTS:
            raise ConfigError(
                f"layouts[{pattern!r}]: unknown layout {layout!r} (use one of {', '.join(LAYOUTS)})"
            )
    if isinstance(base, str | os.PathLike):
        base, file_delta = load_shapes(base)
        delta = delta if delta is not None else file_delta
    model_shapes = _shapes(model)
    base_shapes = _shapes(base)
    other_shapes = _shapes(delta) if delta is not None else model_shapes
    param_layouts = _layouts(model, layouts)

    tie_names = _aliases(model)
    name_sets = [set(model_shapes), set(base_shapes), set(other_shapes)]
    all_names = set().union(*name_sets)
    varying = all_names - set.intersection(*name_sets)
    block_templates = {_template(n) for n in varying}
    base_counts = Counter(_template(n) for n in base_shapes)
    model_counts = Counter(_template(n) for n in model_shapes)
    base_by_template = {_template(n): s for n, s in base_shapes.items()}
    other_by_template = {_template(n): s for n, s in other_shapes.items()}

    def counterpart(shapes: dict[str, tuple], by_template: dict[str, tuple], name: str):
        # exact name first; a block index the other model lacks falls back to its template
        return shapes.get(name, by_template.get(_template(name)))

    roles: dict[str, ParamRole] = {}
    for name, shape in model_shapes.items():
        tpl = _template(name)
        base_shape = counterpart(base_shapes, base_by_template, name)
        other_shape = counterpart(other_shapes, other_by_template, name)
        if base_shape is None or other_shape is None:
            raise ConfigError(
                f"parameter {name!r} has no counterpart in the base/delta model; "
                "build them from the same architecture"
            )
        if len(base_shape) != len(shape) or len(other_shape) != len(shape):
            raise ConfigError(
                f"parameter {name!r} changes rank between widths: {base_shape} vs {shape}"
            )
        grows = [b != o or b != s for b, o, s in zip(base_shape, other_shape, shape, strict=True)]
        mults = [s / b for s, b in zip(shape, base_shape, strict=True)]
        in_block = tpl in block_templates
        m_depth = model_counts[tpl] / base_counts[tpl] if in_block else 1.0
        occurrences = {}
        for occurrence in (name, *tie_names.get(name, [])):
            forced = next(
                (r for pat, r in overrides.items() if fnmatch.fnmatchcase(occurrence, pat)), None
            )
            layout = param_layouts.get(occurrence, "unknown")
            role, m_in, m_out, fan_in, fan_out = _classify(
                occurrence, shape, grows, mults, layout, forced
            )
            occurrences[occurrence] = ParamRole(
                role, m_in, m_out, in_block, m_depth, fan_in, fan_out, layout == "transposed"
            )
        roles[name] = _tied(name, occurrences)
    return roles


def _tied(name: str, occurrences: dict[str, ParamRole]) -> ParamRole:
    """One entry for a tensor reached under several names. The same role everywhere (a layer
    shared between places) is that role; an embedding that is also a readout keeps the
    embedding's (input) rules and names its readout (RULES.md §3, "Tied embedding and
    readout"); anything else is not supported."""
    kinds = {info.role for info in occurrences.values()}
    if len(kinds) == 1:
        return occurrences[name]
    if kinds == {"input", "output"}:
        inputs = [n for n, i in occurrences.items() if i.role == "input"]
        outputs = [n for n, i in occurrences.items() if i.role == "output"]
        if len(outputs) == 1:
            readout = outputs[0].rsplit(".", 1)[0] if "." in outputs[0] else ""
            return dataclasses.replace(occurrences[inputs[0]], tied_readout=readout)
    found = ", ".join(f"{n} as {i.role}" for n, i in occurrences.items())
    raise ConfigError(
        f"one tensor is used in roles that need different rules ({found}); only an embedding "
        "tied to one readout is supported: untie the weights or pass overrides= for one name"
    )


def _classify(
    name: str,
    shape: tuple,
    grows: list[bool],
    mults: list[float],
    layout: str,
    forced: Role | None,
) -> tuple[Role, float, float, int, int]:
    if len(shape) <= 1:
        m = mults[0] if shape else 1.0
        if forced not in (None, "vector"):
            raise ConfigError(
                f"override for {name!r}: a {len(shape)}-D parameter can only be 'vector'"
            )
        return "vector", 1.0, m, 1, shape[0] if shape else 1
    growing = [i for i, g in enumerate(grows) if g]
    if layout == "embedding":
        out_dim, in_dims = 1, [0]
    elif layout == "transposed":
        if len(shape) != 2:
            raise ConfigError(f"{name!r}: a 'transposed' layout needs a matrix, got shape {shape}")
        out_dim, in_dims = 1, [0]
    elif layout == "linear" or (forced is None and not growing):
        out_dim, in_dims = 0, list(range(1, len(shape)))
    elif forced is not None and forced != "hidden":
        # the override says which growing dimension is which
        if forced == "input":
            out_dim = growing[0] if growing else 0
        else:
            fixed = [i for i in range(len(shape)) if i not in growing]
            if not fixed:
                raise ConfigError(
                    f"override {name!r} -> 'output' needs a dimension that stays fixed with "
                    f"width, but shape {shape} grows in every dimension; use 'hidden' or fix "
                    "the override's pattern"
                )
            out_dim = fixed[0]
        in_dims = [i for i in range(len(shape)) if i != out_dim]
    elif len(shape) == 2 and len(growing) == 2 and shape[0] == shape[1]:
        out_dim, in_dims = 0, [1]  # square and both fans grow: either order gives the same fans
    else:
        raise ConfigError(
            f"cannot tell fan_in from fan_out of {name!r} (shape {shape}, owned by a module "
            "that is not Linear/Embedding/Conv/Conv1D); pass layouts={"
            f"{name!r}: 'linear' or 'transposed'}} or overrides={{{name!r}: 'input' or 'output'}}"
        )
    m_out, fan_out = mults[out_dim], shape[out_dim]
    m_in, fan_in = 1.0, 1
    for i in in_dims:
        m_in *= mults[i]
        fan_in *= shape[i]
    out_grows = grows[out_dim]
    in_grows = any(grows[i] for i in in_dims)
    inferred: Role
    if out_grows and in_grows:
        inferred = "hidden"
    elif in_grows:
        inferred = "output"
    else:
        inferred = "input"  # fan_in fixed; a matrix with no growing dimension has every rule 1
    return forced or inferred, m_in, m_out, fan_in, fan_out
