"""Run configuration: TOML files with ``--section.key value`` command-line overrides.

Every key is a dataclass field, so an unknown key, a value of the wrong type or an invalid
value is a one-line ``ConfigError`` before any work starts.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .models import ARCHS, GPTConfig, config_class
from .models.common import DecoderConfig, base_config
from .optim import get_spec, normalize_options
from .parametrize import ALL_HP_MULTIPLIERS, Parametrization

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class OptimSection:
    """Base-model hyperparameters; μP rescales lr, weight_decay and eps per tensor. Keys left
    unset (or set to "none") take the optimizer's own default; keys an optimizer does not
    have are ignored by it."""

    name: str = "adamw"  # adamw | sgd | adopt | lamb | lion | sophia | muon | shampoo | soap
    lr: float = 3e-3
    weight_decay: float = 0.0
    decay_vectors: bool = False
    spectral_normalize: bool = False  # wrap in SpectralNormalized (Qiu et al.; RULES.md §6)
    betas: tuple[float, float] | None = None
    eps: float | None = None  # Adam-like eps; Shampoo's damping epsilon
    momentum: float | None = None  # sgd
    nesterov: bool | None = None  # sgd
    decouple: bool | None = None  # adopt: decoupled weight decay (default true)
    adam_lr: float | None = None  # muon: base LR of the AdamW part (embeddings, head, vectors)
    adam_weight_decay: float | None = None  # muon: weight decay of the AdamW part
    shape_factor: str | None = None  # muon: spectral | original | moonlight
    rho: float | None = None  # sophia
    hessian_interval: int | None = None  # sophia: steps between Hessian estimates
    block_size: int | None = None  # shampoo, soap: fixed block size (0 = no blocking)
    grafting: str | None = None  # shampoo: none | sgd | adagrad | adam
    exponents: tuple[float, float] | None = None  # shampoo: (e_L, e_R)
    precondition_frequency: int | None = None  # shampoo, soap: steps between roots / bases
    shampoo_beta: float | None = None  # soap: EMA of the Kronecker factors (none = β2)


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 16
    max_iters: int = 1000
    warmup_iters: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 100
    eval_iters: int = 20
    patience: int = 0  # stop when val loss has not improved for this many iterations; 0 = off
    loss_ceiling: float = 0.0  # a loss above this is divergence; 0 = 2·ln(vocab_size)
    seed: int = 0
    checkpoint_interval: int = 0  # 0 = at every eval
    out_dir: str = "runs/train"
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    progress: bool = True
    grad_accum: int = 1  # micro-batches per step (per rank under torchrun)
    parallel: str = "ddp"  # ddp | fsdp: how ranks share the model under torchrun
    stop_at: int = 0  # pause this invocation at this iteration (checkpointed); 0 = off


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # "" = Tiny Shakespeare; a text file; or a directory with train.bin/val.bin
    vocab_size: int = 0  # for .bin data without meta.json


@dataclass(frozen=True)
class RunConfig:
    # the [model] section: ``arch = "gpt"`` (default) or ``"llama"``, then that architecture's
    # config fields (GPTConfig, LlamaConfig)
    model: DecoderConfig = field(default_factory=lambda: GPTConfig(block_size=128))
    param: Parametrization = field(default_factory=Parametrization)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)

    def __post_init__(self) -> None:
        base_config(self.model, self.param)  # the base model must exist (heads divide it)
        get_spec(self.optim.name)  # unknown optimizer: fail before loading data
        t = self.train
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "grad_accum"):
            if getattr(t, name) <= 0:
                raise ConfigError(
                    f"train.{name} must be a positive integer, got {getattr(t, name)}"
                )
        for name in ("warmup_iters", "patience", "checkpoint_interval", "stop_at"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.schedule must be cosine, linear or constant, got {t.schedule!r}"
            )
        if t.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(
                f"train.batch_size {t.batch_size} does not split into train.grad_accum "
                f"{t.grad_accum} micro-batches; make it a multiple of {t.grad_accum}"
            )
        if t.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be float32 or bfloat16, got {t.dtype!r}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.optim.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {
            f.name: {
                k: v
                for k, v in _plain(dataclasses.asdict(getattr(self, f.name))).items()
                if (f.name, k) not in _DERIVED
            }
            for f in fields(self)
        }
        out["model"] = {"arch": self.model.arch, **out["model"]}
        return out


def retarget_model(model: dict[str, Any], from_arch: str) -> dict[str, Any]:
    """A [model] table written for ``from_arch`` (e.g. a sweep's base config, every key set)
    whose ``arch`` was changed: keys that hold ``from_arch``'s defaults say nothing and are
    dropped (the new architecture's defaults apply: the GPT's unset ``rope_theta`` is the
    Llama's 10000), and a key the new architecture lacks is an error otherwise (never
    ignored)."""
    arch = model.get("arch", GPTConfig.arch)
    if arch == from_arch:
        return model
    keep = set(_field_types("model", arch))
    defaults = {f.name: f.default for f in fields(config_class(from_arch))}
    out = {}
    for key, value in model.items():
        says_nothing = defaults.get(key, object()) == (
            list(value) if isinstance(value, tuple) else value
        )
        if key in keep and not says_nothing:
            out[key] = value
        elif not says_nothing:
            raise ConfigError(
                f"model.{key} = {value!r} is set for the {from_arch} model, which the {arch} "
                f"model does not have; remove it or keep model.arch = {from_arch!r}"
            )
    return out


def optimizer_options(cfg: RunConfig) -> dict[str, Any]:
    """The [optim] keys the run's optimizer has, set in ``cfg``, under the optimizer's own
    names (``optim.eps`` is its ε, whatever it calls it), and the tokens per step for an
    optimizer whose curvature estimate takes them (Sophia's ``bs``)."""
    o = cfg.optim
    spec = get_spec(o.name)
    given = {key: getattr(o, key, None) for key in spec.config_keys()}
    options = normalize_options(spec, {k: v for k, v in given.items() if v is not None})
    if spec.curvature and spec.curvature.tokens:
        options[spec.curvature.tokens] = cfg.train.batch_size * cfg.model.block_size
    return options


def model_config(model: DecoderConfig, vocab_size: int) -> DecoderConfig:
    """The model section with the vocabulary size of the data."""
    return dataclasses.replace(model, vocab_size=vocab_size)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


_ALIASES = {"optimizer": "optim.name"}  # `smup train CFG --optimizer lion`
_DERIVED = {("model", "vocab_size")}  # set from the data, never from a config
SECTIONS: dict[str, type] = {f.name: f.type for f in fields(RunConfig)}  # type: ignore[misc]
_SECTION_TYPES = {name: typing.get_type_hints(RunConfig)[name] for name in SECTIONS}


def _field_types(section: str, arch: str | None = None) -> dict[str, Any]:
    """Key → type of one section; the [model] section's keys are ``arch`` and those of the
    architecture ``arch`` (None: of every architecture)."""
    if section == "model":
        classes = [config_class(arch)] if arch is not None else [c for c, _ in ARCHS.values()]
        types_: dict[str, Any] = {"arch": str}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            types_.update({f.name: hints[f.name] for f in fields(cls)})
    else:
        types_ = typing.get_type_hints(_SECTION_TYPES[section])
    return {k: v for k, v in types_.items() if (section, k) not in _DERIVED}


def optimizer_option(assignment: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, value typed like ``OptimSection.KEY``), e.g. ``block_size=128``."""
    types_ = typing.get_type_hints(OptimSection)
    return _typed_option("--opt", "optim", assignment, types_, ("name", "lr", "weight_decay"))


def model_option(assignment: str, arch: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, value typed like the [model] key of ``arch``), e.g.
    ``n_kv_heads=1``."""
    types_ = _field_types("model", arch)
    return _typed_option("--model", "model", assignment, types_, ("arch", "width", "depth"))


def _typed_option(
    flag: str, section: str, assignment: str, types_: dict[str, Any], reserved: tuple[str, ...]
) -> tuple[str, Any]:
    key, sep, text = assignment.partition("=")
    if not sep or key not in types_ or key in reserved:
        options = ", ".join(k for k in types_ if k not in reserved)
        raise ConfigError(f"{flag} needs KEY=VALUE with KEY one of: {options}; got {assignment!r}")
    return key, _coerce(f"{section}.{key}", text, types_[key])


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check (TOML values) or parse (command-line strings) one value against its type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or len(items) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(items, args, strict=True))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be of type {getattr(typ, '__name__', typ)}, got {value!r}")


def _known_keys() -> dict[str, list[str]]:
    return {s: list(_field_types(s)) for s in SECTIONS}


def resolve_key(key: str) -> tuple[str, str]:
    """'train.max_iters', 'max-iters' or 'max_iters' -> ('train', 'max_iters')."""
    key = key.lstrip("-").replace("-", "_")
    key = _ALIASES.get(key, key)
    if "." in key:
        _reject_derived(*key.split(".", 1))
    known = _known_keys()
    if "." in key:
        section, name = key.split(".", 1)
        if section in known and name in known[section]:
            return section, name
    else:
        owners = [s for s, names in known.items() if key in names]
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            raise ConfigError(
                f"config key {key!r} is ambiguous; write it as one of "
                + ", ".join(f"{s}.{key}" for s in owners)
            )
    raise ConfigError(
        f"unknown config key {key!r}; valid keys are section.key with sections "
        f"{', '.join(known)} (see configs/*.toml)"
    )


def _reject_derived(section: str, key: str) -> None:
    if (section, key) in _DERIVED:
        raise ConfigError(
            f"{section}.{key} is set from the data; remove it (for .bin data "
            "without meta.json, set data.vocab_size)"
        )


def build_config(values: dict[str, dict[str, Any]]) -> RunConfig:
    """A validated ``RunConfig`` from nested ``{section: {key: value}}``."""
    sections: dict[str, Any] = {}
    for section, items in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{section}]; use {', '.join(SECTIONS)}")
        if not isinstance(items, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs")
        arch = None
        if section == "model":
            arch = _coerce("model.arch", items.get("arch", GPTConfig.arch), str)
        types_ = _field_types(section, arch)
        kwargs = {}
        for key, value in items.items():
            _reject_derived(section, key)
            if key not in types_:
                where = f"[{section}]" if arch is None else f"[model] with arch = {arch!r}"
                raise ConfigError(
                    f"unknown config key '{section}.{key}'; valid keys in "
                    f"{where}: {', '.join(types_)}"
                )
            kwargs[key] = _coerce(f"{section}.{key}", value, types_[key])
        if arch is not None:
            kwargs.pop("arch", None)
            sections[section] = config_class(arch)(**kwargs)
        else:
            sections[section] = _SECTION_TYPES[section](**kwargs)
    return RunConfig(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or the defaults) and apply ``--key value`` overrides."""
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path} is not UTF-8 text") from None
    for key, value in parse_overrides(overrides or []):
        section, name = resolve_key(key)
        values.setdefault(section, {})[name] = value
    return build_config(values)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c=2'] -> [('a.b', '1'), ('c', '2')]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --section.key value"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with some keys of some sections changed (validated)."""
    values = cfg.to_dict()
    for section, items in sections.items():
        values.setdefault(section, {}).update(items)
    return build_config(values)


# ------------------------------------------------------------------------ run identity

# train.* keys that change how a run executes, not what it computes: outside a run's
# fingerprint (a sweep run's id) and free to change between a run and its resume
RUNTIME_KEYS = frozenset(
    {"out_dir", "resume", "progress", "device", "grad_accum", "parallel", "stop_at"}
)

# Keys added after run ids existed, at the value that trains the run it was before them:
# there they are left out of the fingerprint, so adding them kept every stored id and
# checkpoint (model.arch: the GPT was the only model; the transferable HP multipliers of
# issue 13: 1; the GPT's model.position: learned positions were the only ones).
LATER_KEYS: dict[tuple[str, str], Any] = {
    ("model", "arch"): "gpt",
    ("model", "position"): "learned",
    **{("param", k): 1.0 for k in ALL_HP_MULTIPLIERS},
}


def fingerprint(cfg: RunConfig | dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The parts of a config (a ``RunConfig`` or its ``to_dict()``, e.g. a checkpoint's
    stored fingerprint) that identify a run — a checkpoint must agree with them to be
    resumed, and a sweep's run id hashes them: every key but the runtime ones
    (:data:`RUNTIME_KEYS`), none set to ``None`` (an unset option is its default, so adding
    an optional key keeps existing ids and checkpoints), and none of :data:`LATER_KEYS` at
    its old value."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return {
        section: {
            k: v
            for k, v in items.items()
            if v is not None
            and not (section == "train" and k in RUNTIME_KEYS)
            and not ((section, k) in LATER_KEYS and v == LATER_KEYS[section, k])
        }
        for section, items in d.items()
    }
