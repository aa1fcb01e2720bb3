"""Muon: parity with torch.optim.Muon, shape factors, sub-blocks, Newton–Schulz properties,
the AdamW part, and routing through build_optimizer (OPTIMIZERS.md §7, §8, §10)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.optim._muon as torch_muon

import spectral_mup
from spectral_mup import Parametrization
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import REGISTRY, Muon
from spectral_mup.optim.muon import newton_schulz

SHAPES = [(24, 16), (16, 40), (32, 32)]
STEPS = 25


def _fp64_zeropower(grad, ns_coefficients, ns_steps, eps):
    """torch's ``_zeropower_via_newtonschulz`` with ``grad.to(float64)`` for ``.bfloat16()``."""
    a, b, c = ns_coefficients
    ortho_grad = grad.to(torch.float64)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


def _problem(dtype: torch.dtype, seed: int = 0):
    """Initial matrices and fixed targets; the gradient of
    Σ ½‖W − T‖² + 0.1·Σ sin(W) is (W − T) + 0.1·cos(W)."""
    gen = torch.Generator().manual_seed(seed)
    inits = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    return inits, targets


def _set_grads(params, targets) -> None:
    for w, t in zip(params, targets, strict=True):
        w.grad = (w.detach() - t) + 0.1 * torch.cos(w.detach())


def _run(opt, params, targets, steps: int = STEPS) -> list[list[torch.Tensor]]:
    trajectory = []
    for _ in range(steps):
        _set_grads(params, targets)
        opt.step()
        trajectory.append([w.detach().clone() for w in params])
    return trajectory


def test_fp64_parity_with_torch_muon(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _fp64_zeropower)
    inits, targets = _problem(torch.float64)
    ours = [torch.nn.Parameter(w.clone()) for w in inits]
    theirs = [torch.nn.Parameter(w.clone()) for w in inits]
    opt_ours = Muon(
        ours,
        lr=0.02,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.1,
        shape_factor="original",
        ns_dtype=torch.float64,
    )
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    traj_ours = _run(opt_ours, ours, targets)
    traj_theirs = _run(opt_theirs, theirs, targets)
    max_diff = max(
        (a - b).abs().max().item()
        for step_a, step_b in zip(traj_ours, traj_theirs, strict=True)
        for a, b in zip(step_a, step_b, strict=True)
    )
    assert max_diff <= 1e-10, max_diff
    # the parameters really moved (the comparison is not vacuous)
    assert min((w.detach() - w0).norm().item() for w, w0 in zip(ours, inits, strict=True)) > 0.1
    # and the momentum state agrees too
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(
            opt_ours.state[a]["momentum_buffer"],
            opt_theirs.state[b]["momentum_buffer"],
            rtol=0,
            atol=1e-10,
        )


def test_default_precision_close_to_stock_torch_muon():
    inits, targets = _problem(torch.float32, seed=1)
    ours = [torch.nn.Parameter(w.clone()) for w in inits]
    theirs = [torch.nn.Parameter(w.clone()) for w in inits]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, shape_factor="original")  # fp32 NS on CPU
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)  # bf16 NS
    _run(opt_ours, ours, targets)
    _run(opt_theirs, theirs, targets)
    rel = [
        ((a.detach() - w0) - (b.detach() - w0)).norm().item() / (b.detach() - w0).norm().item()
        for a, b, w0 in zip(ours, theirs, inits, strict=True)
    ]
    assert max(rel) <= 0.02, rel
    assert all(w.dtype == torch.float32 for w in ours)


def _one_step_update(shape, shape_factor: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = Muon(
        [w],
        lr=1.0,
        weight_decay=0.0,
        shape_factor=shape_factor,
        ns_dtype=torch.float64,
    )
    w.grad = g.clone()
    opt.step()
    return w.detach() - w0, newton_schulz(g, dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "shape_factor", "factor"),
    [
        ((40, 10), "spectral", 2.0),
        ((40, 10), "original", 2.0),
        ((40, 10), "moonlight", 0.2 * math.sqrt(40)),
        ((10, 40), "spectral", 0.5),
        ((10, 40), "original", 1.0),
        ((10, 40), "moonlight", 0.2 * math.sqrt(40)),
    ],
)
def test_shape_factor(shape, shape_factor, factor):
    # first step from zero momentum: the Nesterov blend is (1 − μ²)·g, and NS drops the scale
    delta, ortho = _one_step_update(shape, shape_factor)
    torch.testing.assert_close(delta, -factor * ortho, rtol=0, atol=1e-12)


def test_split_equals_separate_blocks():
    n = 12
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    targets = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    fused = torch.nn.Parameter(w0.clone())
    parts = [torch.nn.Parameter(b.clone()) for b in w0.split(n)]
    kw = dict(lr=0.05, weight_decay=0.1, shape_factor="spectral", ns_dtype=torch.float64)
    opt_fused = Muon([{"params": [fused], "split": 3}], **kw)
    opt_parts = Muon(parts, **kw)
    for _ in range(10):
        g = (fused.detach() - targets) + 0.1 * torch.cos(fused.detach())
        fused.grad = g
        for part, gb in zip(parts, g.split(n), strict=True):
            part.grad = gb.clone()
        opt_fused.step()
        opt_parts.step()
        separate = torch.cat([p.detach() for p in parts])
        assert (fused.detach() - separate).abs().max().item() <= 1e-12
    assert (fused.detach() - w0).norm() > 0.1
    # without the split the fused matrix would be orthogonalized as one (36, 12) block
    whole = torch.nn.Parameter(w0.clone())
    opt_whole = Muon([whole], **kw)
    whole.grad = (w0 - targets) + 0.1 * torch.cos(w0)
    opt_whole.step()
    fused_one = torch.nn.Parameter(w0.clone())
    opt_one = Muon([{"params": [fused_one], "split": 3}], **kw)
    fused_one.grad = whole.grad.clone()
    opt_one.step()
    assert (whole.detach() - fused_one.detach()).abs().max() > 1e-3


def test_batched_ns_equals_per_matrix():
    gen = torch.Generator().manual_seed(4)
    for shape in [(5, 16, 24), (2, 3, 24, 16)]:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        batched = newton_schulz(g)
        flat_in, flat_out = g.reshape(-1, *shape[-2:]), batched.reshape(-1, *shape[-2:])
        for x, y in zip(flat_in, flat_out, strict=True):
            assert (newton_schulz(x) - y).abs().max().item() <= 1e-12
        # per-matrix normalization: scaling one matrix leaves the others unchanged
        scaled = g.clone()
        scaled.reshape(-1, *shape[-2:])[0] *= 1e3
        assert (newton_schulz(scaled) - batched).abs().max().item() <= 1e-12


@pytest.mark.parametrize("c", [1e-3, 10.0])
def test_ns_scale_invariance(c):
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert (newton_schulz(c * g) - newton_schulz(g)).abs().max().item() <= 1e-6


def test_ns_transpose_equivariance():
    g = torch.randn(20, 36, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert (newton_schulz(g.T) - newton_schulz(g).T).abs().max().item() <= 1e-12
    sq = torch.randn(24, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert (newton_schulz(sq.T) - newton_schulz(sq).T).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_ns_singular_values(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    out = newton_schulz(g)
    assert out.dtype == dtype and out.shape == g.shape
    s = torch.linalg.svdvals(out.double())
    assert s.max().item() <= 1.25, s.max().item()
    assert s.min().item() >= 0.6, s.min().item()  # well-conditioned rectangular input


def test_ns_zero_matrix_is_finite():
    for dtype in (torch.float64, torch.float32):
        out = newton_schulz(torch.zeros(8, 16, dtype=dtype))
        assert torch.isfinite(out).all() and not out.any()
    # a zero gradient in a Muon step leaves the (undecayed) parameter unchanged
    w = torch.nn.Parameter(torch.ones(6, 4))
    opt = Muon([w], lr=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(6, 4))


def test_adamw_part_matches_torch_adamw():
    gen = torch.Generator().manual_seed(9)
    inits = [torch.randn(17, generator=gen, dtype=torch.float64)]
    inits.append(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    targets = [torch.randn_like(w) for w in inits]
    ours = [torch.nn.Parameter(w.clone()) for w in inits]
    theirs = [torch.nn.Parameter(w.clone()) for w in inits]
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    opt_ours = Muon(
        [{"params": ours, "aux": True, "lr": lr, "weight_decay": wd}],
        lr=0.02,
        betas=betas,
        eps=eps,
    )
    opt_theirs = torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for _ in range(STEPS):
        _set_grads(ours, targets)
        _set_grads(theirs, targets)
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs, strict=True):
            assert (a.detach() - b.detach()).abs().max().item() <= 1e-12
    for a, b, w0 in zip(ours, theirs, inits, strict=True):
        assert (a.detach() - w0).abs().max() > 1e-2
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt_ours.state[a][key], opt_theirs.state[b][key], rtol=0, atol=1e-12
            )


def test_build_optimizer_routing_and_state_dict():
    p = Parametrization(kind="mup", base_width=32, base_depth=1)
    cfg = GPTConfig(width=64, depth=2, n_heads=2, vocab_size=65, block_size=8)
    torch.manual_seed(0)
    model = GPT(cfg, p)
    opt = spectral_mup.build_optimizer("muon", model, p, lr=0.02, adam_lr=3e-3)
    assert isinstance(opt, Muon)
    assert REGISTRY["muon"].defaults["shape_factor"] == "spectral"
    roles = model.smup_roles
    shapes = dict(model.named_parameters())
    seen = []
    for group in opt.param_groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            seen.append(name)
            rule = p.scales("muon", roles[name]).lr
            hidden = "attn.c_" in name or "mlp.c_" in name
            if hidden and shapes[name].ndim == 2:
                assert group["aux"] is False, name
                assert group["role"] == "hidden", name
                assert rule == 1.0  # the shape factor is the optimizer's, not also a 1/m
                assert group["lr"] == pytest.approx(0.02 * rule, rel=1e-12), name
                assert group["lr_mult"] == pytest.approx(1.0), name
                assert group["shape_factor"] == "spectral"
                qkv = (cfg.width,) * 3  # row sizes of the fused q, k, v
                assert group["split"] == (qkv if name.endswith("attn.c_attn.weight") else 1), name
            else:
                assert group["aux"] is True, name
                assert group["role"] != "hidden", name  # no hidden matrix on the AdamW part
                assert group["lr"] == pytest.approx(3e-3 * rule, rel=1e-12), name
                assert group["split"] == 1
                if name in ("wte.weight", "wpe.weight"):
                    assert group["lr"] == pytest.approx(3e-3, rel=1e-12), name
    assert sorted(seen) == sorted(shapes)
    assert any(g["split"] == (cfg.width,) * 3 for g in opt.param_groups)

    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator())
    for _ in range(2):
        opt.zero_grad()
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()

    sd = opt.state_dict()
    assert len(sd["param_groups"]) == len(opt.param_groups)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert len(loaded["param_groups"]) == len(opt.param_groups)
    fresh = spectral_mup.build_optimizer("muon", model, p, lr=0.02, adam_lr=3e-3)
    fresh.load_state_dict(loaded)
    for a, b in zip(fresh.param_groups, opt.param_groups, strict=True):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"
        }
    for t in model.parameters():
        for key, value in opt.state[t].items():
            assert torch.equal(fresh.state[t][key], value), key


def test_rejects_vector_in_muon_group():
    with pytest.raises(ValueError, match=r"aux=True"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match=r"7 rows do not split into 3 equal blocks"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(7, 4))], "split": 3}])
    with pytest.raises(ValueError, match=r"split sizes \(4, 2\) do not add up to 7 rows"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(7, 4))], "split": (4, 2)}])
    Muon([{"params": [torch.nn.Parameter(torch.zeros(8))], "aux": True}])  # accepted


def test_state_dict_from_before_transposed_and_split_keys_still_steps():
    """A checkpoint written before groups had ``transposed``/``split`` resumes (torch's
    load_state_dict takes the saved groups as they are)."""
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([w], lr=0.1)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["transposed"], group["split"]
    fresh = Muon([w], lr=0.1)
    fresh.load_state_dict(sd)
    w.grad = torch.randn(8, 4)
    fresh.step()


def test_compiled_model_keeps_the_fused_qkv_split():
    """``smup_splits`` patterns name the unwrapped model's parameters; torch.compile's
    ``_orig_mod.`` prefix must not merge q, k and v into one block."""
    p = spectral_mup.Parametrization(kind="mup", base_width=32)
    cfg = GPTConfig(width=64, n_heads=4, n_kv_heads=2, block_size=8, vocab_size=20)
    compiled = torch.compile(GPT(cfg, p))
    opt = spectral_mup.build_optimizer("muon", compiled, p, lr=0.02)
    splits = {n: g["split"] for g in opt.param_groups for n in g["names"]}
    assert splits["blocks.0.attn.c_attn.weight"] == (64, 32, 32)
    assert splits["blocks.0.attn.c_proj.weight"] == 1
