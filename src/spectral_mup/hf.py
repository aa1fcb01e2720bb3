"""Hugging Face ``transformers`` causal LMs, μP-ready in one call (optional extra
``spectral-mup[hf]``)::

    import spectral_mup as smup
    from spectral_mup import hf

    model = transformers.LlamaForCausalLM(config)          # or GPT2LMHeadModel, ...
    roles = hf.parametrize(model, p)                       # base/delta built from the config
    opt = smup.build_optimizer("muon", model, p, lr=0.02)

What it does, from ``model.config`` alone (no base model code needed on the cluster):

* builds the base model (``p.base_width``, ``p.base_depth``) and a wider, deeper copy on the
  ``meta`` device from resized copies of the config (:func:`resized_config`), infers the
  roles (GPT-2's ``Conv1D`` is read as ``(fan_in, fan_out)``; a head tied to the embedding
  keeps the embedding's rules), scales the readout's input by 1/m (tied or not) and
  re-initializes every weight by the rules (RULES.md §3) — this replaces the model's own
  init (GPT-2's 1/sqrt(2·n_layer) on ``c_proj`` included);
* sets the attention scale on every attention module that keeps it as ``module.scaling``
  (transformers' convention): sqrt(d_base)/d_head, with d_base the base model's head size —
  SP's 1/sqrt(d_head) again when heads are added at a fixed size (``heads="size"``, the
  default, as Llama and GPT-2 grow); GPT-2's ``scale_attn_by_inverse_layer_idx`` factor is
  kept;
* multiplies each residual branch's output by m_L^-α where depth scaling is on, with a
  forward hook on the decoder layers' attention and MLP modules. Supported layer layouts
  (:data:`BRANCHES`): ``self_attn``/``mlp`` (Llama, Mistral, Qwen2, Gemma, ...) and
  ``attn``/``mlp`` (GPT-2); any other layer with depth scaling on is an error naming the
  fix.

Roles and multipliers are plain attributes by parameter name (``model.smup_roles``), never
tensor attributes.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .parametrize import Parametrization, remove_hooks
from .parametrize import parametrize as parametrize_module
from .roles import ParamRole

WIDTH_KEY = "hidden_size"  # transformers maps GPT-2's n_embd, n_layer, n_head to these names
DEPTH_KEY = "num_hidden_layers"
HEADS_KEY = "num_attention_heads"
KV_HEADS_KEY = "num_key_value_heads"
FFN_KEYS = ("intermediate_size", "n_inner")  # None (GPT-2's n_inner) = a multiple of width
# attribute names of a decoder layer's two residual branches
BRANCHES: tuple[tuple[str, str], ...] = (("self_attn", "mlp"), ("attn", "mlp"))


def _get(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    if value is None:
        raise ConfigError(
            f"{type(config).__name__} has no {key!r}; hf.parametrize reads width, depth and "
            "heads from it — pass base_config= and delta_config= built by hand"
        )
    return value


def head_dim(config: Any) -> int:
    """The config's attention head size (``head_dim`` when set, else width // heads)."""
    d = getattr(config, "head_dim", None)
    return int(d) if d else _get(config, WIDTH_KEY) // _get(config, HEADS_KEY)


def resized_config(config: Any, width: int, depth: int, *, heads: str = "size") -> Any:
    """A copy of a transformers config at another width and depth. The MLP size scales with
    width; ``heads="size"`` keeps the head size (the head count, and the key/value head
    count, grow with width), ``heads="count"`` keeps the head count."""
    if heads not in ("size", "count"):
        raise ConfigError(f"heads must be 'size' or 'count', got {heads!r}")
    old_width, old_heads, d = _get(config, WIDTH_KEY), _get(config, HEADS_KEY), head_dim(config)
    cfg = copy.deepcopy(config)
    setattr(cfg, WIDTH_KEY, width)
    setattr(cfg, DEPTH_KEY, depth)
    for key in FFN_KEYS:
        ffn = getattr(cfg, key, None)
        if ffn:
            scaled = ffn * width / old_width
            if scaled != int(scaled):
                raise ConfigError(
                    f"{key} {ffn} at width {old_width} is {scaled:g} at width {width}; pick "
                    "widths at which the MLP size stays a whole number"
                )
            setattr(cfg, key, int(scaled))
    if heads == "size":
        if width % d:
            raise ConfigError(f"width {width} is not a multiple of the head size {d}")
        n_heads = width // d
        kv = getattr(cfg, KV_HEADS_KEY, None)
        if kv:
            group = old_heads // kv
            if n_heads % group:
                raise ConfigError(
                    f"width {width} gives {n_heads} heads, not a multiple of the {group} query "
                    "heads per key/value head"
                )
            setattr(cfg, KV_HEADS_KEY, n_heads // group)
        setattr(cfg, HEADS_KEY, n_heads)
    else:
        if width % old_heads:
            raise ConfigError(f"width {width} is not divisible by {old_heads} heads")
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = width // old_heads
    return cfg


def parametrize(
    model: nn.Module,
    p: Parametrization,
    *,
    base_config: Any = None,
    delta_config: Any = None,
    heads: str = "size",
    overrides: dict[str, Any] | None = None,
    layouts: dict[str, str] | None = None,
    init: bool = True,
) -> dict[str, ParamRole]:
    """Make a transformers causal LM μP-ready (module docstring). ``base_config`` /
    ``delta_config``: configs of the base model and of another size (default: ``model.config``
    resized to ``p.base_width`` × ``p.base_depth`` and to twice the width, one layer more)."""
    config = model.config
    width, depth = _get(config, WIDTH_KEY), _get(config, DEPTH_KEY)
    if base_config is None:
        base_config = resized_config(config, p.base_width, p.base_depth, heads=heads)
    if delta_config is None:
        delta_config = resized_config(
            config,
            2 * max(width, _get(base_config, WIDTH_KEY)),
            max(depth, _get(base_config, DEPTH_KEY)) + 1,
            heads=heads,
        )
    with torch.device("meta"):
        base, delta = type(model)(base_config), type(model)(delta_config)
    roles = parametrize_module(
        model, p, base, delta, overrides=overrides, layouts=layouts, init=init
    )
    _set_attention_scale(model, p, head_dim(base_config))
    _scale_branches(model, p.branch_multiplier(depth), depth)
    model.smup_splits = fused_blocks(model)
    return roles


def fused_blocks(model: nn.Module) -> dict[str, int]:
    """Fused projections that optimizers which orthogonalize (Muon) must treat as equal
    logical blocks: GPT-2's ``c_attn`` (q, k, v in one Conv1D), per parameter-name pattern."""
    patterns = {}
    for name, module in model.named_modules():
        c_attn = getattr(module, "c_attn", None)
        if (
            c_attn is not None
            and hasattr(module, "split_size")
            and not getattr(module, "is_cross_attention", False)
        ):
            patterns[re.sub(r"\.\d+\.", ".*.", f"{name}.c_attn.weight")] = 3
    return patterns


def _set_attention_scale(model: nn.Module, p: Parametrization, d_base: int) -> None:
    attention = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "head_dim")]
    needed = p.attention_scale(head_dim(model.config), d_head_base=d_base)
    sp = p.attention_scale(head_dim(model.config), d_head_base=head_dim(model.config))
    depth = _get(model.config, DEPTH_KEY)
    if len(attention) < depth and abs(needed - sp) > 1e-12 * sp:
        raise ConfigError(
            f"{type(model).__name__}: {len(attention)} of its {depth} layers' attention modules "
            "keep their scale as a `scaling` attribute, so μP's attention scale cannot be set "
            "on all of them; keep the head size fixed (heads='size') or set "
            "Parametrization(attention='sp')"
        )
    for module in attention:
        if getattr(module, "scale_attn_weights", True) is False:
            continue  # GPT-2 with scale_attn_weights=False: no scaling to replace
        scale = p.attention_scale(int(module.head_dim), d_head_base=d_base)
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(module.layer_idx + 1)
        module.scaling = scale


class BranchMultiplier:
    """Forward hook: multiply a residual branch's output (a tensor, or a tuple's first
    element) by a constant. A class rather than a closure, so the model pickles."""

    def __init__(self, multiplier: float):
        self.multiplier = multiplier

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * self.multiplier, *output[1:])
        return output * self.multiplier


def _decoder_layers(model: nn.Module, depth: int) -> list[nn.Module]:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    return list(lists[0]) if len(lists) == 1 else []


def _scale_branches(model: nn.Module, multiplier: float, depth: int) -> None:
    remove_hooks(model, BranchMultiplier)  # parametrizing twice must not stack
    if multiplier == 1.0:
        return
    layers = _decoder_layers(model, depth)
    branches = [next((b for b in BRANCHES if all(hasattr(x, n) for n in b)), None) for x in layers]
    if not layers or None in branches:
        kind = type(layers[0]).__name__ if layers else "decoder layer"
        raise ConfigError(
            f"cannot find the residual branches of {type(model).__name__}'s {kind} (known: "
            f"{', '.join('/'.join(b) for b in BRANCHES)}); build the Parametrization with "
            "depth_alpha=0 (no residual-branch multiplier) or train at the base depth"
        )
    for layer, names in zip(layers, branches, strict=True):
        for name in names:
            getattr(layer, name).register_forward_hook(BranchMultiplier(multiplier))


# ------------------------------------------------------------------ coordinate check


def causal_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM whose output has ``.logits``."""
    logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def coord_taps(model: nn.Module) -> dict[str, nn.Module]:
    """The coordinate check's layer groups of a decoder LM (the bundled models' names): each
    layer's attention and MLP branch (``block{i}.attn``, ``block{i}.mlp``), the residual
    stream after the last layer and the logits."""
    depth = _get(model.config, DEPTH_KEY)
    layers = _decoder_layers(model, depth)
    names = next((b for b in BRANCHES if layers and all(hasattr(layers[0], n) for n in b)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if names is None or head is None:
        raise ConfigError(
            f"cannot find the decoder layers' {' or '.join('/'.join(b) for b in BRANCHES)} "
            f"branches or the head of {type(model).__name__}; pass taps= to coord_check"
        )
    out = {}
    for i, layer in enumerate(layers):
        out[f"block{i}.attn"], out[f"block{i}.mlp"] = (getattr(layer, n) for n in names)
    out["residual"], out["logits"] = layers[-1], head
    return out
