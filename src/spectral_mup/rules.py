"""The scaling rules of docs/RULES.md: data plus small pure functions (no torch).

The spectral condition (Yang, Simon & Bernstein 2023, arXiv 2310.17813) asks that every
weight matrix and every update of it have spectral norm ~ sqrt(fan_out / fan_in). If an
optimizer's raw update has spectral norm N, the learning rate must scale as

    lr ∝ sqrt(fan_out / fan_in) / N                                  (RULES.md §2)

so an optimizer's whole μP is one *update-norm model* N. Each model below is one line:
the spectral norm of the **effective** update (the update of ``c·W``, where ``c`` is the
layer's forward multiplier) per unit learning rate, for a layer with fan_in ``fi`` and
fan_out ``fo``. Every norm is a monomial in (fi, fo, c), so the ratio of a layer's rule to
the same layer's rule in the base model depends only on the width multipliers — that is
what the functions here return: multipliers relative to the base model, all exactly 1 at
the base width and depth, so μP equals SP there.

Depth (RULES.md §4; Yang et al. TP-VI arXiv 2310.02244, Dey et al. CompleteP arXiv
2505.01618): a residual branch is multiplied by ``a = m_L^-α``. Parameters inside a branch
see ``a`` like a forward multiplier, and each of the L blocks may move the residual stream
by 1/L, so for an optimizer whose update is homogeneous of degree k in the gradient scale
(Adam-like k = 0, SGD k = 1) the in-block LR scales as ``m_L^(α(1+k) - 1)``.
α = 0 switches depth scaling off (every depth factor is 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from math import sqrt
from typing import Any, Literal

Role = Literal["input", "hidden", "output", "vector"]
ROLES: tuple[Role, ...] = ("input", "hidden", "output", "vector")
Readout = Literal["multiplier", "init"]
DEPTH_ALPHAS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class UpdateFamily:
    """An update-norm model: everything μP needs to know about an optimizer."""

    name: str
    norm: Callable[[float, float, float, Role], float]
    """(fan_in, fan_out, c, role) -> spectral norm of the effective update per unit LR. The
    role says which fans grow with width (``narrow_fan``); only a norm that needs the
    smaller fan reads it."""
    grad_degree: float
    """k in update(s·g) = s^k · update(g): 0 for normalized updates, 1 for SGD."""
    eps_follows_grad: bool
    """The optimizer's eps is compared with gradient entries (Adam-like), so it scales with them."""
    decay_in_direction: bool
    """Weight decay enters the normalized direction (LAMB's λθ inside the trust ratio)."""
    source: str
    follows_weight: bool = False
    """The update is proportional to ‖W‖, so a zero-initialized tensor cannot grow: the
    readout is not zero-initialized by default."""


def narrow_fan(fi: float, fo: float, role: Role) -> float:
    """The fan that is smaller *as width grows*: the fixed one of an input layer (fan_in =
    vocabulary) or a readout (fan_out = vocabulary), whatever its size — a 50257-token
    embedding at width 256 is still an input layer (RULES.md §3, "Vocabulary larger than
    width") — and the numerically smaller one of a hidden matrix, whose fans both grow."""
    if role == "input":
        return fi
    if role == "output":
        return fo
    return min(fi, fo)


def _trust_ratio_norm(fi: float, fo: float, c: float, role: Role) -> float:
    """LAMB's ‖W‖_F/‖u‖_F · u is an entrywise direction (norm sqrt(fi·fo)) times RMS(W) of
    a spectrally initialized raw weight, (1/sqrt(fi))·sqrt(narrow/fi)/c (narrow = fan_in
    unless fan_out is the narrow fan, ``narrow_fan``); with the forward multiplier c the
    effective update loses the c again. So lr ∝ 1/sqrt(narrow): hidden η/sqrt(m), input and
    readout η at any vocabulary size. The seed paper's ‖W‖_F ≈ ‖W‖_* (lr constant) leaves
    hidden coordinate-check slopes of +0.16…+0.27 (docs/RULES.md)."""
    return sqrt(fo * narrow_fan(fi, fo, role) / fi)


def _family(name, norm, k, eps, decay_in, follows_weight, source) -> UpdateFamily:
    return UpdateFamily(name, norm, k, eps, decay_in, source, follows_weight)


# One row per update family. norm = spectral norm of the effective update per unit LR;
# k = gradient homogeneity; eps = Adam-like eps follows gradient entries; decay_in = λθ is
# inside the normalized direction; follows_W = update ∝ ‖W‖ (zero init cannot grow).
# fmt: off
FAMILIES: dict[str, UpdateFamily] = {f.name: f for f in (
    #       name                   N(fan_in, fan_out, c, role)        k    eps    decay_in follows_W
    _family("entrywise",           lambda fi, fo, c, r: c * sqrt(fi * fo), 0.0, True, False, False,
            "sign-like entries ~1, low stable rank: ‖Ψ‖* ≈ ‖Ψ‖_F (Gupta et al. 2026 §3.1)"),
    _family("orthogonalized",      lambda fi, fo, c, r: c,           0.0, False, False, False,
            "U·Vᵀ has every singular value 1 (Qiu et al. 2025; Bernstein & Newhouse 2024)"),
    _family("trust_ratio",         _trust_ratio_norm,                 0.0, True,  True,  True,
            "‖W‖/‖u‖·u: a sign-like u scaled by RMS(W) (measured; docs/RULES.md §3, LAMB)"),
    _family("spectral_normalized", lambda fi, fo, c, r: sqrt(fo / fi), 0.0, False, False, False,
            "the update is rescaled to the target norm explicitly (Qiu et al. 2025)"),
    _family("raw_gradient",        lambda fi, fo, c, r: c**2 * sqrt(fi / fo), 1.0, False, False,
            False, "μP gradient of c·W: ‖∇‖* ~ sqrt(fi/fo), W's is c·∇ (Yang, Simon, Bernstein)"),
)}
# fmt: on

# Shape factors an orthogonalizing optimizer multiplies its U·Vᵀ by (RULES.md §3, Muon).
# The library owns the factor: its effect is part of the update-norm model, so μP's LR
# multiplier never stacks a second width factor on top of it.
SHAPE_FACTORS: dict[str, Callable[[float, float], float]] = {
    "spectral": lambda fi, fo: sqrt(fo / fi),  # μP: ‖update‖* = sqrt(fan_out/fan_in)
    "original": lambda fi, fo: sqrt(max(1.0, fo / fi)),  # Keller Jordan; torch.optim.Muon
    "moonlight": lambda fi, fo: 0.2 * sqrt(max(fi, fo)),  # Moonlight: update RMS ≈ 0.2
}


def kronecker_family(
    exponents: tuple[float, float] = (0.25, 0.25), block_size: int | None = None
) -> UpdateFamily:
    """Shampoo/SOAP with exponents (e_L, e_R) and fixed-size blocks (Qiu et al. 2025, RULES.md
    §3): lr ∝ (fan_out/fan_in)^(1−s) / (m_L^(2s−1) · n_blocks^s), s = e_L + e_R, i.e. an update
    norm c^(1+k)·(fan_out/fan_in)^(s−½)·n_blocks^s with gradient degree k = 1 − 2s.
    n_blocks = ⌈fan_out/b⌉·⌈fan_in/b⌉, so a matrix smaller than a block is one block and
    unblocked e = ¼ is exactly the orthogonalized family; with b fixed and fans ≫ b the
    width rule becomes AdamW's 1/fan_in. SOAP is Adam in Shampoo's e = ¼ eigenbasis."""
    s = float(exponents[0]) + float(exponents[1])
    if block_size is None and s == 0.5:
        return FAMILIES["orthogonalized"]
    k = 1.0 - 2.0 * s

    def norm(fi: float, fo: float, c: float, role: Role) -> float:
        if block_size is None:
            blocks = 1
        else:
            blocks = math.ceil(fo / block_size) * math.ceil(fi / block_size)
        return c ** (1.0 + k) * (fo / fi) ** (s - 0.5) * blocks**s

    return UpdateFamily(
        f"kronecker(e={exponents[0]:g}+{exponents[1]:g}, block={block_size})",
        norm,
        k,
        eps_follows_grad=False,
        decay_in_direction=False,
        source="blocked Shampoo/SOAP (Qiu et al. 2025, arXiv 2512.05620)",
    )


def grafted_family(block_size: int | None = None) -> UpdateFamily:
    """Shampoo with Adam or AdaGrad grafting: each block of the update is the Kronecker
    direction L^-e·G·R^-e rescaled to the Frobenius norm of the grafted entrywise update,
    sqrt(b_out·b_in) per unit LR. That direction has nearly equal singular values (exactly
    U·Vᵀ after one summed step), so its spectral norm is the Frobenius norm over
    sqrt(rank), rank = min(fan_in, fan_out, b): N = c·sqrt(fan_in·fan_out / min(fan_in,
    fan_out, b)) (**changed**, measured; docs/RULES.md). Unblocked, a hidden matrix gets
    η/sqrt(m), not AdamW's η/m (which leaves coordinate-check slopes of −0.23…−0.46, the
    drift Qiu et al. saw); with fixed blocks (fans ≫ b) it is AdamW's 1/fan_in again;
    embedding and readout (one fan fixed) keep AdamW's rule."""

    def norm(fi: float, fo: float, c: float, role: Role) -> float:
        rank = min(narrow_fan(fi, fo, role), block_size or math.inf)
        return c * sqrt(fi * fo / rank)

    return UpdateFamily(
        f"grafted(block={block_size})",
        norm,
        0.0,
        eps_follows_grad=True,
        decay_in_direction=False,
        source="Adam-grafted Kronecker direction: ‖·‖_F of Adam, flat spectrum (measured)",
    )


def soap_family(block_size: int | None = None) -> UpdateFamily:
    """SOAP's matrices. Blocked: Qiu et al.'s blocked formula with s = ½ (``kronecker_family``;
    measured flat with b = 128 at widths 64→512, max |slope| 0.14). Unblocked: AdamW's
    entrywise rules (**changed**; docs/RULES.md): §3 calls unblocked SOAP orthogonalized, which
    holds only when the eigenbasis diagonalizes the current gradient; with a basis from earlier
    gradients Adam normalizes every rotated entry to about ±1, a dense sign-like update.
    Measured (coordinate check, widths 64→512): orthogonalized rule +1.07…+1.30, AdamW's rule
    −0.19…−0.09."""
    if block_size:
        return kronecker_family((0.25, 0.25), block_size)
    return FAMILIES["entrywise"]


def preconditioned_family(
    grafting: str = "none",
    exponents: tuple[float, float] = (0.25, 0.25),
    block_size: int | None = None,
) -> UpdateFamily:
    """The family of a Shampoo/SOAP matrix: grafting hands the per-block norm to the grafted
    update (Adam/AdaGrad → ``grafted_family``, SGD → SGD rules; RULES.md §3), else Qiu et
    al.'s blocked formula (``kronecker_family``)."""
    if grafting in ("adam", "adagrad"):
        return grafted_family(block_size or None)
    if grafting == "sgd":
        return FAMILIES["raw_gradient"]
    return kronecker_family(exponents, block_size or None)


def growing_fan(fi: float, fo: float, role: Role) -> float:
    """The fan that grows with width: fan_out of an input layer or a vector, fan_in of a
    readout, sqrt(fan_in·fan_out) of a hidden matrix (both grow)."""
    if role == "hidden":
        return sqrt(fi * fo)
    return fi if role == "output" else fo


def fitted_family(
    exponents: Mapping[str, float],
    grad_degree: float,
    *,
    eps_follows_grad: bool = True,
    decay_in_direction: bool = False,
    follows_weight: bool = False,
    source: str = "measured by smup probe",
) -> UpdateFamily:
    """A measured update-norm model (``smup probe``): N = c^(1+k)·g^e_role, g the fan that
    grows with width (``growing_fan``), e_role the exponent the probe fitted for the raw
    update (the effective update of c·W is c·c^k·ΔW: a degree-k update of a gradient scaled
    by c). Every known family is of this form along a width path at fixed aspect ratios."""
    e = {role: float(exponents[role]) for role in ROLES}

    def norm(fi: float, fo: float, c: float, role: Role) -> float:
        return c ** (1.0 + grad_degree) * growing_fan(fi, fo, role) ** e[role]

    label = ", ".join(f"{r} {e[r]:+.2f}" for r in ROLES)
    return UpdateFamily(
        f"fitted({label}; k={grad_degree:.2f})",
        norm,
        grad_degree,
        eps_follows_grad,
        decay_in_direction,
        source,
        follows_weight,
    )


# ------------------------------------------------------------------------ optimizer rules


@dataclass(frozen=True)
class OptimizerRule:
    """One optimizer's whole μP rule, read in one place: the update family of each role
    (``"*"``: every role not named), how its eps scales, the roles it hands to an auxiliary
    AdamW rule with its own base LR and decay, and how its options change the families. A
    probed rule (``spectral_mup.probe``) is the same kind of record, with ``measured`` set."""

    name: str
    families: Mapping[str, UpdateFamily]
    eps: str | Mapping[str, str | None] | None = "family"
    """Per rule or per role (a mapping): "entry" (an Adam-like ε, compared with gradient
    entries), "gram" (a damping ε added to G·Gᵀ, compared with ‖G‖²), None (not scaled),
    "family": "entry" where the role's family has ``eps_follows_grad``, else None."""
    auxiliary: tuple[Role, ...] = ()
    configure: Callable[[Mapping[str, Any]], Mapping[str, UpdateFamily]] | None = None
    """The optimizer's options → the families they select (merged over ``families``)."""
    source: str = ""
    normalized: bool = False
    """Every matrix update is rescaled to its target spectral norm (``SpectralNormalized``)."""
    measured: Mapping[str, Any] | None = None
    """The probe's measurements, for a probed rule."""

    def family(self, role: Role) -> UpdateFamily:
        """The family that governs parameters of ``role``."""
        return self.families.get(role) or self.families["*"]

    def eps_rule(self, role: Role) -> str | None:
        """How the eps of a ``role`` parameter scales: "entry", "gram" or None."""
        eps = self.eps.get(role) if isinstance(self.eps, Mapping) else self.eps
        if eps == "family":
            return "entry" if self.family(role).eps_follows_grad else None
        return eps

    def is_auxiliary(self, role: Role) -> bool:
        """True when ``role`` goes to the auxiliary rule (Muon's AdamW part)."""
        return role in self.auxiliary

    @property
    def follows_weight(self) -> bool:
        """A matrix update is proportional to ‖W‖ (LAMB): a zero readout cannot grow."""
        return self.family("hidden").follows_weight

    def with_options(self, options: Mapping[str, Any]) -> OptimizerRule:
        """The rule for the optimizer built with ``options`` (Muon's shape factor, Shampoo's
        and SOAP's grafting, exponents and blocking) — matrices only: vectors keep the
        optimizer's own family unless the hook names them. ValueError on a bad option."""
        if self.configure is None:
            return self
        try:
            chosen = self.configure(options)
        except (TypeError, KeyError, ZeroDivisionError) as exc:
            raise ValueError(str(exc)) from None
        families = {**self.families, "vector": self.family("vector"), **chosen}
        return replace(self, families=families, configure=None)

    def spectral_normalized(self) -> OptimizerRule:
        """Under explicit spectral normalization every matrix is ``spectral_normalized`` (§6);
        vectors keep the optimizer's own family."""
        families = {"vector": self.family("vector"), "*": FAMILIES["spectral_normalized"]}
        return replace(self, name=f"spectral({self.name})", families=families, normalized=True)


def _shaped(options: Mapping[str, Any]) -> dict[str, UpdateFamily]:
    """Muon: an orthogonalized update times a shape factor f has norm model c·f(fan_in, fan_out)."""
    name = options.get("shape_factor", "spectral")
    if name not in SHAPE_FACTORS:
        raise ValueError(f"shape_factor must be one of {', '.join(SHAPE_FACTORS)}, got {name!r}")
    factor = SHAPE_FACTORS[name]
    orth = FAMILIES["orthogonalized"]
    norm = lambda fi, fo, c, r: c * factor(fi, fo)  # noqa: E731
    return {"hidden": replace(orth, name=f"orthogonalized·{name}", norm=norm)}


def _entry(name: str, family: str, source: str, **kw: Any) -> OptimizerRule:
    return OptimizerRule(name, {"*": FAMILIES[family]}, source=source, **kw)


# Each optimizer's rule: the family per role (FAMILIES above), the eps rule, the auxiliary
# roles and the options hook. Adding an optimizer to μP is one record here (plus its
# registry entry in optim/registry.py), or a probed rule (``smup probe``).
ENTRYWISE, ORTHOGONALIZED = FAMILIES["entrywise"], FAMILIES["orthogonalized"]
# fmt: off
OPTIMIZER_RULES: dict[str, OptimizerRule] = {r.name: r for r in (
    _entry("adamw", "entrywise", "m/(sqrt(v)+ε): entries ~±1 (seed paper; RULES.md §3)"),
    _entry("adopt", "entrywise", "same Ψ as AdamW up to the order of updates (App. C.1)"),
    _entry("sophia", "entrywise", "clip(m/(ρh), 1): entries bounded by 1, sign-like (App. C.2)"),
    _entry("lion", "entrywise", "sign(·): every entry ±1"),
    _entry("lamb", "trust_ratio", "φ(‖W‖)/‖u‖·u (App. C.3; hidden η/sqrt(m) measured)"),
    _entry("sgd", "raw_gradient", "the μP gradient (Yang, Simon & Bernstein 2023)"),
    # NS(momentum) on hidden matrices, times the shape factor (default "spectral"); AdamW rest
    OptimizerRule("muon", {**_shaped({}), "*": ENTRYWISE},
                  auxiliary=("input", "output", "vector"), configure=_shaped,
                  source="U·Vᵀ·f(fan_in, fan_out) on hidden matrices (Qiu et al. 2025)"),
    # e = ¼, unblocked, ungrafted: L^-¼ G R^-¼ ≈ U·Vᵀ (§3); vectors: diagonal AdaGrad; a
    # damping ε added to G·Gᵀ
    OptimizerRule("shampoo", {"vector": ENTRYWISE, "*": ORTHOGONALIZED}, eps="gram",
                  configure=lambda o: {"*": preconditioned_family(
                      o["grafting"], o["exponents"], o["block_size"])},
                  source="Qiu et al. 2025 (blocked); grafted: measured (docs/RULES.md)"),
    # Adam in Shampoo's eigenbasis: unblocked entrywise (measured; §3 says orthogonalized);
    # blocked: Qiu et al.'s formula. Its ε is compared with rotated gradient entries.
    OptimizerRule("soap", {"*": ENTRYWISE}, eps="entry",
                  configure=lambda o: {"*": soap_family(o["block_size"])},
                  source="measured (docs/RULES.md, SOAP); blocked: Qiu et al. 2025"),
)}
# fmt: on


def rule_for(optimizer: str, options: Mapping[str, Any] | None = None) -> OptimizerRule:
    """The registered rule of ``optimizer``, configured by its ``options`` if given."""
    try:
        rule = OPTIMIZER_RULES[optimizer]
    except KeyError:
        known = ", ".join(sorted(OPTIMIZER_RULES))
        raise KeyError(f"no scaling rule for optimizer {optimizer!r} (known: {known})") from None
    return rule if options is None else rule.with_options(options)


# --------------------------------------------------------------------------- forward pass


def readout_multiplier(m_in: float, readout: Readout = "multiplier") -> float:
    """Forward multiplier of the output layer: logits = head(x) / m (RULES.md §3)."""
    return 1.0 / m_in if readout == "multiplier" else 1.0


def forward_multiplier(role: Role, m_in: float, readout: Readout = "multiplier") -> float:
    """The forward multiplier ``c`` of a parameter's layer: 1/m for the readout, else 1."""
    return readout_multiplier(m_in, readout) if role == "output" else 1.0


def attention_scale(d_head: int, d_head_base: int, mode: str = "mup") -> float:
    """Attention-logit scale. ``mup``: sqrt(d_base)/d_head (equals 1/sqrt(d_head) at the base);
    ``inverse``: 1/d_head; ``sp``: 1/sqrt(d_head) (RULES.md §3)."""
    if mode == "mup":  # = sqrt(d_base)/d_head, written to equal the SP value exactly at the base
        return math.sqrt(d_head_base / d_head) / math.sqrt(d_head)
    if mode == "inverse":
        return 1.0 / d_head
    if mode == "sp":
        return 1.0 / math.sqrt(d_head)
    raise ValueError(f"unknown attention scaling {mode!r} (use mup, inverse or sp)")


def branch_multiplier(m_depth: float, alpha: float) -> float:
    """Residual-branch multiplier m_L^-α (RULES.md §4)."""
    return m_depth ** (-alpha)


def init_std_multiplier(role: Role, m_in: float, readout: Readout = "multiplier") -> float:
    """Init std relative to the base std σ_b (RULES.md §3): input σ_b, hidden σ_b/sqrt(m),
    output σ_b with the 1/m readout multiplier (σ_b/m without it). Vectors keep their
    module's init (gains 1, biases 0)."""
    if role == "hidden":
        return 1.0 / math.sqrt(m_in)
    if role == "output":
        return 1.0 if readout == "multiplier" else 1.0 / m_in
    return 1.0


# ------------------------------------------------------------------------------ optimizer


def lr_scale(
    family: UpdateFamily, fan_in: float, fan_out: float, c: float, role: Role = "hidden"
) -> float:
    """The spectral condition's LR: sqrt(fan_out/fan_in) / N(fan_in, fan_out, c) (§2)."""
    return math.sqrt(fan_out / fan_in) / family.norm(fan_in, fan_out, c, role)


def width_lr_multiplier(
    family: UpdateFamily,
    fan_in: float,
    fan_out: float,
    m_in: float,
    m_out: float,
    c: float,
    role: Role = "hidden",
) -> float:
    """``lr_scale`` of the layer relative to the same layer in the base model, whose fans are
    fan_in/m_in and fan_out/m_out and whose forward multiplier is 1."""
    return lr_scale(family, fan_in, fan_out, c, role) / lr_scale(
        family, fan_in / m_in, fan_out / m_out, 1.0, role
    )


def depth_lr_multiplier(family: UpdateFamily, m_depth: float, alpha: float) -> float:
    """In-block LR factor m_L^(α(1+k) - 1); 1 when depth scaling is off (α = 0)."""
    if alpha == 0:
        return 1.0
    return m_depth ** (alpha * (1.0 + family.grad_degree) - 1.0)


def eps_multiplier(
    rule: str | None, role: Role, m_in: float, m_out: float, c: float, a: float
) -> float:
    """Under μP a matrix's gradient entries scale as c·a/m_out and its squared spectral norm as
    (c·a)²·m_in/m_out (‖δy‖² ∝ 1/fan_out, ‖x‖² ∝ fan_in). So an Adam-like eps ("entry") is
    ε·c·a/m_out — ε/m for input, hidden and readout, ε/(m·m_L^α) in hidden blocks — and a
    Shampoo damping ("gram") ε·(c·a)²·m_in/m_out — ε/m for input and readout, ε/m_L^(2α) in
    hidden blocks (RULES.md §3–4). Vectors keep ε."""
    if rule is None or role == "vector":
        return 1.0
    if rule == "entry":
        return c * a / m_out
    if rule == "gram":
        return (c * a) ** 2 * m_in / m_out
    raise ValueError(f"unknown eps rule {rule!r} (entry, gram or None)")


def coupled_wd_multiplier(family: UpdateFamily, lr_multiplier: float) -> float:
    """Torch-style decay lr·λ per step: λ rescaled so that lr·λ stays width- and
    depth-invariant (RULES.md §5); λ unchanged where it sits inside the direction (LAMB)."""
    return 1.0 if family.decay_in_direction else 1.0 / lr_multiplier


def independent_weight_decay(
    family: UpdateFamily, weight_decay: float, group_lr: float, width_factor: float
) -> float:
    """The torch ``weight_decay`` value that makes the per-step decay schedule·λ·width_factor,
    independent of the peak LR (RULES.md §5). ``width_factor`` is 1 (μP: λ constant) or
    base_width/width (Qiu et al.: λ ∝ 1/width)."""
    if family.decay_in_direction:
        return weight_decay
    if weight_decay == 0:
        return 0.0
    return weight_decay * width_factor / group_lr


@dataclass(frozen=True)
class Scales:
    """All multipliers of one parameter, relative to the base model."""

    init_std: float
    forward: float
    lr: float
    weight_decay: float
    eps: float


def param_scales(
    family: UpdateFamily,
    role: Role,
    fan_in: float,
    fan_out: float,
    m_in: float,
    m_out: float,
    m_depth: float = 1.0,
    in_block: bool = False,
    alpha: float = 1.0,
    readout: Readout = "multiplier",
    eps: str | None = "family",
) -> Scales:
    """Every multiplier of one parameter (coupled weight decay), for a layer with fans
    ``fan_in``/``fan_out`` (a vector is a fan_in = 1 matrix) that are ``m_in``/``m_out`` times
    the base model's. Pass m_in = m_out = m_depth = 1 for SP: every rule is then 1, which is
    how μP equals SP at the base model. ``eps`` is the eps rule ("entry", "gram", None);
    "family" takes the family's (entry when ``family.eps_follows_grad``)."""
    if eps == "family":
        eps = "entry" if family.eps_follows_grad else None
    c = forward_multiplier(role, m_in, readout)
    a = branch_multiplier(m_depth, alpha) if in_block else 1.0
    lr = width_lr_multiplier(family, fan_in, fan_out, m_in, m_out, c, role)
    if in_block:
        lr *= depth_lr_multiplier(family, m_depth, alpha)
    return Scales(
        init_std=init_std_multiplier(role, m_in, readout),
        forward=c,
        lr=lr,
        weight_decay=coupled_wd_multiplier(family, lr),
        eps=eps_multiplier(eps, role, m_in, m_out, c, a),
    )
