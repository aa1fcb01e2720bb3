"""Optimizers against oracles and the papers' formulas (docs/OPTIMIZERS.md §2–4), exact
resume from a state_dict, and basic API behaviour.

Oracles: ``torch-adopt==0.1.0`` (official ADOPT, for-loop path) and ``sophia-opt==0.2.2``
(official SophiaG). LAMB and Lion are checked against fp64 references written here.
"""

from __future__ import annotations

import io
import math

import adopt as adopt_oracle
import pytest
import sophia_opt
import torch
import torch.nn.functional as F

from spectral_mup import Parametrization, build_optimizer
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import ADOPT, LAMB, REGISTRY, Lion, SophiaG

# the frozen official ADOPT calls torch APIs that torch 2.13 deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_compiling.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Use _accelerator_graph_capture_health_check"),
]

SHAPES = [(24, 16), (16, 40), (12,)]
F64 = torch.float64


# --------------------------------------------------------------------------------------
# A deterministic fp64 problem shared by every parity test
# --------------------------------------------------------------------------------------


class Problem:
    """Fixed fp64 parameters, targets and per-step noise; gradients are closed-form
    functions of (params, step), so both sides of a comparison see identical gradients
    whenever their parameters are identical."""

    def __init__(self, seed: int = 0, steps: int = 40, scale: float = 1.0):
        gen = torch.Generator().manual_seed(seed)

        def randn(shape):
            return torch.randn(shape, generator=gen, dtype=F64)

        self.init = [scale * randn(s) for s in SHAPES]
        self.targets = [randn(s) for s in SHAPES]
        self.amps = [randn(s) for s in SHAPES]
        # step-varying noise with a step-varying scale: makes |g_t| / sqrt(v_{t-1}) large
        # for some coordinates (exercises ADOPT's clip) and keeps sign(m) from freezing
        self.noise = [[(0.5 + 1.5 * (k % 4 == 0)) * randn(s) for s in SHAPES] for k in range(steps)]
        self.label_noise = [[randn(s) for s in SHAPES] for _ in range(steps)]

    def params(self) -> list[torch.Tensor]:
        return [p.clone() for p in self.init]

    def grads(self, params, k: int) -> list[torch.Tensor]:
        """∇ of Σ ½(θ−t)² + a·sin(3θ)/3, plus fixed noise for step k."""
        return [
            (p - t) + a * torch.cos(3 * p) + n
            for p, t, a, n in zip(params, self.targets, self.amps, self.noise[k], strict=True)
        ]

    def sampled_grads(self, params, k: int) -> list[torch.Tensor]:
        """A second deterministic gradient, standing in for Sophia's sampled-label one."""
        return [
            0.3 * torch.tanh(p) + 0.2 * a + 0.5 * n
            for p, a, n in zip(params, self.amps, self.label_noise[k], strict=True)
        ]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def max_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def run_pair(prob, ours, ref, steps, *, step_ref=None, before=None, after=None) -> list[float]:
    """Step ``ours`` and ``ref`` (built on prob.params() copies) on identical gradients;
    returns max |Δθ| after every step."""
    gaps = []
    for k in range(steps):
        for opt in (ours, ref):
            params = opt.param_groups[0]["params"]
            set_grads(params, prob.grads(params, k))
        if before is not None:
            before(k)
        ours.step()
        if step_ref is None:
            ref.step()
        else:
            step_ref(ref)
        if after is not None:
            after(k)
        gaps.append(max_gap(ours.param_groups[0]["params"], ref.param_groups[0]["params"]))
    return gaps


def moved(prob, params) -> float:
    return max_gap(prob.init, params)


# --------------------------------------------------------------------------------------
# ADOPT vs torch-adopt (official code)
# --------------------------------------------------------------------------------------

ADOPT_CASES = {
    "no_wd": dict(weight_decay=0.0, decouple=False),
    "l2_wd": dict(weight_decay=0.1, decouple=False),
    "decoupled_wd": dict(weight_decay=0.1, decouple=True),
}


@pytest.mark.parametrize("case", list(ADOPT_CASES))
def test_adopt_matches_official(case):
    kw = dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, **ADOPT_CASES[case])
    prob = Problem()
    ours = ADOPT(prob.params(), clip_exponent=0.25, **kw)
    ref = adopt_oracle.ADOPT(prob.params(), foreach=False, **kw)

    clipped = [0]

    def count_clipped(k):
        # entries of ĝ = g/max(sqrt(v_prev), ε) beyond ±k^¼ on this step (from our state)
        for p in ours.param_groups[0]["params"]:
            state = ours.state.get(p)
            if not state or state["step"].item() == 0:
                continue
            g = p.grad + kw["weight_decay"] * p if not kw["decouple"] else p.grad
            normed = g / state["exp_avg_sq"].sqrt().clamp(min=kw["eps"])
            clipped[0] += int((normed.abs() > state["step"].item() ** 0.25).sum())

    gaps = run_pair(prob, ours, ref, 30, before=count_clipped)
    print(f"\nADOPT[{case}] max|Δθ| over 30 steps: {max(gaps):.3e} ({clipped[0]} clipped)")
    assert max(gaps) <= 1e-10
    assert clipped[0] > 100  # the clip is exercised
    assert moved(prob, ours.param_groups[0]["params"]) > 1e-2
    for p_ours, p_ref in zip(
        ours.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True
    ):
        s, r = ours.state[p_ours], ref.state[p_ref]
        assert s["step"].item() == r["step"].item() == 30
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=0, atol=1e-10)
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=0, atol=1e-10)


def test_adopt_parity_check_detects_a_different_clip_schedule():
    """Negative control: timm's default exponent (1/3) is visibly different."""
    prob = Problem()
    ours = ADOPT(prob.params(), lr=1e-2, clip_exponent=1 / 3)
    ref = adopt_oracle.ADOPT(prob.params(), lr=1e-2, foreach=False)
    assert max(run_pair(prob, ours, ref, 30)) > 1e-4


def test_adopt_first_call_initializes_without_update():
    prob = Problem()
    params = prob.params()
    opt = ADOPT(params, lr=1e-2, weight_decay=0.1, decouple=True)
    grads = prob.grads(params, 0)
    set_grads(params, grads)
    opt.step()
    for p, p0, g in zip(params, prob.init, grads, strict=True):
        assert torch.equal(p, p0)  # no update, no decoupled decay on the first call
        state = opt.state[p]
        assert torch.equal(state["exp_avg_sq"], g * g)  # v = g² exactly
        assert not state["exp_avg"].any()
        assert state["step"].item() == 1
    set_grads(params, prob.grads(params, 1))
    opt.step()
    assert moved(prob, params) > 0


def test_adopt_late_first_gradient_is_initialized_then():
    """A tensor whose first gradient arrives at step 3 is initialized (v = g², no update)
    on that step, as in the official for-loop path (the foreach path divides by ε)."""
    prob = Problem()
    params = prob.params()
    ref_params = prob.params()
    opt = ADOPT(params, lr=1e-2)
    ref = adopt_oracle.ADOPT(ref_params, lr=1e-2, foreach=False)
    late = 1
    gaps = []
    for k in range(12):
        for ps in (params, ref_params):
            grads = prob.grads(ps, k)
            if k < 3:
                grads[late] = None
            set_grads(ps, grads)
        before = params[late].clone()
        opt.step()
        ref.step()
        gaps.append(max_gap(params, ref_params))
        if k < 3:
            assert torch.equal(params[late], before)
            assert not opt.state.get(params[late])
        elif k == 3:
            assert torch.equal(params[late], before)  # initialized, not updated
            g = params[late].grad
            assert torch.equal(opt.state[params[late]]["exp_avg_sq"], g * g)
            assert opt.state[params[late]]["step"].item() == 1
            assert opt.state[params[0]]["step"].item() == 4
        else:
            assert not torch.equal(params[late], before)
    print(f"\nADOPT[late first gradient] max|Δθ| over 12 steps: {max(gaps):.3e}")
    assert max(gaps) <= 1e-10


def test_adopt_state_dict_is_serializable():
    prob = Problem()
    params = prob.params()
    opt = ADOPT(params, lr=1e-2)
    for k in range(3):
        set_grads(params, prob.grads(params, k))
        opt.step()
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert isinstance(group["clip_exponent"], float)
    assert group["clip_exponent"] == 0.25
    assert not any(callable(v) for v in group.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["param_groups"][0]["clip_exponent"] == 0.25
    assert loaded["state"][0]["step"].item() == 3


# --------------------------------------------------------------------------------------
# SophiaG vs sophia-opt (official code)
# --------------------------------------------------------------------------------------

SOPHIA_BS = 2000


def test_sophia_matches_official():
    kw = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    prob = Problem()
    ours = SophiaG(prob.params(), bs=SOPHIA_BS, **kw)
    ref = sophia_opt.SophiaG(prob.params(), **kw)
    win_rates = []

    def hessian_update(k):
        win_rates.append(ours.last_win_rate)
        if k % 10 == 9:  # README loop: after that iteration's step
            for opt in (ours, ref):
                params = opt.param_groups[0]["params"]
                set_grads(params, prob.sampled_grads(params, k))
                opt.update_hessian()

    gaps = run_pair(
        prob, ours, ref, 30, step_ref=lambda opt: opt.step(bs=SOPHIA_BS), after=hessian_update
    )
    print(f"\nSophiaG max|Δθ| over 30 steps: {max(gaps):.3e} (final win rate {win_rates[-1]:.3f})")
    assert max(gaps) <= 1e-10
    assert moved(prob, ours.param_groups[0]["params"]) > 1e-2
    # h = 0 for the first 10 steps: every coordinate is clipped (pure sign momentum)
    assert win_rates[:10] == [0.0] * 10
    # afterwards the curvature matters, and not trivially: some clipped, some not
    assert all(0.05 < w < 0.95 for w in win_rates[10:])
    for p_ours, p_ref in zip(
        ours.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True
    ):
        torch.testing.assert_close(
            ours.state[p_ours]["hessian"], ref.state[p_ref]["hessian"], rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            ours.state[p_ours]["exp_avg"], ref.state[p_ref]["exp_avg"], rtol=0, atol=1e-10
        )


def test_sophia_win_rate_by_hand():
    prob = Problem()
    params = prob.params()
    opt = SophiaG(params, lr=1e-2, rho=0.04, bs=SOPHIA_BS)
    for k in range(3):
        set_grads(params, prob.sampled_grads(params, k))
        opt.update_hessian()
        set_grads(params, prob.grads(params, k))
        opt.step()
    won = total = 0
    for p in params:
        state = opt.state[p]
        ratio = state["exp_avg"].abs() / (0.04 * SOPHIA_BS * state["hessian"] + 1e-15)
        won += int((ratio < 1).sum())
        total += p.numel()
    assert 0 < won < total
    assert opt.last_win_rate == won / total


def test_sophia_bs_override_per_call():
    prob = Problem()
    a, b = prob.params(), prob.params()
    opt_a = SophiaG(a, lr=1e-2, bs=SOPHIA_BS)
    opt_b = SophiaG(b, lr=1e-2, bs=7)
    for k in range(4):
        for ps, opt in ((a, opt_a), (b, opt_b)):
            set_grads(ps, prob.sampled_grads(ps, k))
            opt.update_hessian()
            set_grads(ps, prob.grads(ps, k))
        opt_a.step()
        opt_b.step(bs=SOPHIA_BS)
    assert max_gap(a, b) == 0.0


# --------------------------------------------------------------------------------------
# LAMB vs the paper (You et al. 2020, Algorithm 2), written here
# --------------------------------------------------------------------------------------


class LambReference:
    """Algorithm 2, one tensor at a time: m̂, v̂ bias-corrected; r = m̂/(sqrt(v̂)+ε);
    u = r + λθ; θ ← θ − lr·φ(‖θ‖)/‖u‖·u (ratio 1 when ‖θ‖ or ‖u‖ is 0)."""

    def __init__(self, params, lr, betas, eps, weight_decay, phi=lambda z: z):
        self.param_groups = [{"params": params}]
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.phi = lr, betas, eps, weight_decay, phi
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for i, p in enumerate(self.param_groups[0]["params"]):
            g = p.grad
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            u = m_hat / (v_hat.sqrt() + self.eps) + self.wd * p
            w_norm = self.phi(math.sqrt(float((p * p).sum())))
            u_norm = math.sqrt(float((u * u).sum()))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            p.sub_(self.lr * ratio * u)


def test_lamb_matches_paper():
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    prob = Problem()
    ours = LAMB(prob.params(), **kw)
    ref = LambReference(prob.params(), **kw)
    gaps = run_pair(prob, ours, ref, 25)
    print(f"\nLAMB max|Δθ| over 25 steps: {max(gaps):.3e}")
    assert max(gaps) <= 1e-12
    assert moved(prob, ours.param_groups[0]["params"]) > 1e-2


def test_lamb_weight_norm_clamp_matches_paper_phi():
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    prob = Problem(scale=2.0)
    norms = [p.norm().item() for p in prob.init]
    assert max(norms) > 10 > min(norms)  # the clamp is active on some tensors only
    ours = LAMB(prob.params(), weight_norm_clamp=(0.0, 10.0), **kw)
    ref = LambReference(prob.params(), phi=lambda z: min(max(z, 0.0), 10.0), **kw)
    unclamped = LambReference(prob.params(), **kw)
    gaps = run_pair(prob, ours, ref, 25)
    print(f"\nLAMB[clamp 0..10] max|Δθ| over 25 steps: {max(gaps):.3e}")
    assert max(gaps) <= 1e-12
    ref_gaps = run_pair(prob, LAMB(prob.params(), **kw), unclamped, 25)
    assert max(ref_gaps) <= 1e-12
    # negative control: the clamped and unclamped trajectories differ
    assert max_gap(ref.param_groups[0]["params"], unclamped.param_groups[0]["params"]) > 1e-3


def test_lamb_zero_tensor_gets_ratio_one():
    lr = 1e-2
    prob = Problem()
    params = prob.params()
    params[0] = torch.zeros_like(params[0])
    opt = LAMB(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    grads = prob.grads(params, 0)
    set_grads(params, grads)
    opt.step()
    g = grads[0]
    u = g / (g.abs() + 1e-6)  # m̂ = g, v̂ = g² on step 1; λθ = 0
    assert opt.state[params[0]]["trust_ratio"].item() == 1.0
    torch.testing.assert_close(params[0], -lr * u, rtol=0, atol=1e-15)
    assert params[0].abs().max().item() > 0.9 * lr


# --------------------------------------------------------------------------------------
# Lion vs the paper (Chen et al. 2023), written here
# --------------------------------------------------------------------------------------


class LionReference:
    """c = β1·m + (1−β1)·g;  θ ← θ − lr·(sign(c) + λθ);  m ← β2·m + (1−β2)·g."""

    def __init__(self, params, lr, betas, weight_decay):
        self.param_groups = [{"params": params}]
        self.lr, (self.b1, self.b2), self.wd = lr, betas, weight_decay
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for i, p in enumerate(self.param_groups[0]["params"]):
            g = p.grad
            c = self.b1 * self.m[i] + (1 - self.b1) * g
            p.sub_(self.lr * (torch.sign(c) + self.wd * p))
            self.m[i] = self.b2 * self.m[i] + (1 - self.b2) * g


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_matches_paper(weight_decay):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    prob = Problem()
    ours = Lion(prob.params(), **kw)
    ref = LionReference(prob.params(), **kw)
    gaps = run_pair(prob, ours, ref, 25)
    print(f"\nLion[wd={weight_decay}] max|Δθ| over 25 steps: {max(gaps):.3e}")
    assert max(gaps) <= 1e-12
    assert moved(prob, ours.param_groups[0]["params"]) > 0.1


# --------------------------------------------------------------------------------------
# Exact resume from a state_dict, every registered optimizer
# --------------------------------------------------------------------------------------

CFG = GPTConfig(width=32, depth=1, n_heads=2, vocab_size=65, block_size=8)
P = Parametrization(kind="mup", base_width=16, base_depth=1)
BATCH, SEQ = 4, 8


def tiny_setup(name: str, seed: int):
    torch.manual_seed(seed)
    model = GPT(CFG, P)
    extra = {"bs": BATCH * SEQ} if name == "sophia" else {}
    opt = build_optimizer(name, model, P, lr=1e-3, weight_decay=0.1, **extra)
    return model, opt


def tokens(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=gen)


def train_step(model, opt, step: int) -> None:
    idx = tokens(step)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), idx[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if isinstance(opt, SophiaG) and step % 5 == 3:  # Hessian from sampled labels
        gen = torch.Generator().manual_seed(2000 + step)
        logits = model(idx[:, :-1]).reshape(-1, CFG.vocab_size)
        y_hat = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen).squeeze(-1)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y_hat).backward()
        opt.update_hessian()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_state_dict_exact_resume(name, one_thread):
    model, opt = tiny_setup(name, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(6):
        train_step(model, opt, step)
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    if name == "sophia":
        assert any(s["hessian"].any() for s in opt.state.values())

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2, opt2 = tiny_setup(name, seed=1)  # different init: everything must come from ckpt
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    model3, opt3 = tiny_setup(name, seed=2)  # negative control: weights only, fresh state
    model3.load_state_dict(ckpt["model"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)

    for step in range(6, 11):
        for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
            train_step(m, o, step)
    for (n, a), b in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"
    assert any(
        not torch.equal(a, c) for a, c in zip(model.parameters(), model3.parameters(), strict=True)
    )


# --------------------------------------------------------------------------------------
# Goes the right direction; grad-None parameters untouched
# --------------------------------------------------------------------------------------


def make(name: str, params, **kw):
    spec = REGISTRY[name]
    # adam_lr/adam_weight_decay are build_optimizer's (they set the AdamW part's groups)
    options = {k: v for k, v in spec.defaults.items() if not k.startswith("adam_")}
    if name == "muon":  # vectors go to Muon's AdamW part
        params = [{"params": [p], "aux": p.ndim < 2} for p in params]
    return spec.cls(params, **{"lr": 1e-2, **options, **kw})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_reduces_quadratic_loss(name):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 8, generator=gen, dtype=F64) / 4
    target = torch.randn(16, 8, generator=gen, dtype=F64)
    w = torch.randn(8, 8, generator=gen, dtype=F64, requires_grad=True)
    # Shampoo's summed factors make its steps AdaGrad-like (shrinking): a larger lr
    opt = make(name, [w], **({"lr": 0.1} if name == "shampoo" else {}))

    def loss_fn():
        return 0.5 * ((a @ w - target) ** 2).sum()

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    final = loss_fn().item()
    assert math.isfinite(final)
    assert final < 0.97 * losses[0], (name, losses[0], final)
    assert final < losses[5]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_grad_none_params_untouched(name):
    prob = Problem()
    params = prob.params()
    kw = {"weight_decay": 0.1}
    opt = make(name, params, **kw)
    frozen = params[1].clone()
    for k in range(5):
        grads = prob.grads(params, k)
        grads[1] = None
        set_grads(params, grads)
        if name == "sophia" and k == 2:
            opt.update_hessian()
        opt.step()
    assert torch.equal(params[1], frozen)
    assert not opt.state.get(params[1])
    assert not torch.equal(params[0], prob.init[0])


# --------------------------------------------------------------------------------------
# torch's fused kernels where they exist
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_torch_optimizers_take_the_fused_step_unless_the_caller_chose(name):
    """torch's own AdamW and SGD step with one fused kernel per tensor (3.3–5.5× faster AdamW
    steps on CPU than torch's default foreach chain); the parameters move as under foreach,
    to float rounding. A kernel switch the caller sets is kept, and optimizers without a
    fused step get none."""
    p = Parametrization(kind="mup", base_width=32, base_depth=1)
    cfg = GPTConfig(width=64, depth=2, n_heads=2, vocab_size=65, block_size=16)
    runs = {}
    for switch in ({}, {"foreach": True}):
        torch.manual_seed(0)
        model = GPT(cfg, p)
        opt = build_optimizer(name, model, p, lr=1e-2, weight_decay=0.1, **switch)
        assert all(bool(g["fused"]) == (not switch) for g in opt.param_groups)
        assert all(g["foreach"] is (True if switch else None) for g in opt.param_groups)
        x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs[bool(switch)] = model
    for a, b in zip(runs[False].parameters(), runs[True].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model = GPT(cfg, p)
    assert not build_optimizer("lion", model, p, lr=1e-3).defaults.get("fused")


def test_no_fused_step_for_sparse_layers_other_optimizers_or_non_float_tensors():
    """The fused step is only asked for where torch has one that takes every parameter."""
    from spectral_mup.optim import fused_option

    def groups(m):
        return [{"params": list(m.parameters())}]

    dense, sparse = torch.nn.Embedding(10, 4), torch.nn.Embedding(10, 4, sparse=True)
    assert fused_option(torch.optim.SGD, {}, groups(dense), dense) == {"fused": True}
    assert fused_option(torch.optim.SGD, {}, groups(sparse), sparse) == {}  # sparse gradients
    assert fused_option(torch.optim.Adagrad, {}, groups(dense), dense) == {}  # CPU-only fused
    assert fused_option(torch.optim.AdamW, {"fused": False}, groups(dense), dense) == {}
    ints = [{"params": [torch.zeros(3, dtype=torch.int64)]}]
    assert fused_option(torch.optim.AdamW, {}, ints) == {}
