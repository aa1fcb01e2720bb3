"""SpectralNormalized: every matrix update rescaled to its target norm (RULES.md §6)."""

import io
import math

import pytest
import torch

import spectral_mup as smup
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import SpectralNormalized

P = smup.Parametrization(kind="mup", base_width=32, base_depth=1)


def model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(width=64, depth=2, n_heads=2, vocab_size=65, block_size=8), P)


def train(m, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 65, (4, 8), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x).view(-1, 65), x.view(-1)).backward()
        opt.step()


def test_update_norms_match_their_targets():
    m = model()
    opt = smup.build_optimizer("adamw", m, P, lr=1e-2, spectral_normalize=True, betas=(0.9, 0.95))
    assert isinstance(opt, SpectralNormalized)
    assert opt.base.param_groups is opt.param_groups and opt.base.state is opt.state
    train(m, opt, 2)  # the zero head makes step 1's hidden updates zero
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train(m, opt, 1, seed=5)
    lr = 1e-2
    for name, p in m.named_parameters():
        delta = (p - before[name]).reshape(p.size(0), -1)
        if name in ("wte.weight", "wpe.weight"):  # input: RMS-normalized
            assert math.isclose(delta.pow(2).mean().sqrt().item(), lr, rel_tol=1e-4), name
        elif p.ndim == 2:  # hidden and readout: spectral norm lr·sqrt(fo/fi)/c
            c = 1 / 2 if name == "lm_head.weight" else 1.0
            target = lr * math.sqrt(delta.size(0) / delta.size(1)) / c
            sigma = torch.linalg.matrix_norm(delta, ord=2).item()
            assert 0.999 * target <= sigma <= 1.5 * target, (name, sigma, target)


def test_every_matrix_lr_multiplier_is_one():
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=0.5)
    m = GPT(GPTConfig(width=128, depth=4, n_heads=2, vocab_size=65, block_size=8), p)
    opt = smup.build_optimizer("adamw", m, p, lr=1e-2, weight_decay=0.1, spectral_normalize=True)
    for g in opt.param_groups:  # width multipliers 1; in blocks the depth factor m_L^(α-1)
        depth = 2.0**-0.5 if g["in_block"] else 1.0
        assert g["lr"] == pytest.approx(1e-2 * depth)
        if g["role"] != "vector":  # vectors keep the base optimizer's rules (and no decay)
            assert g["weight_decay"] * g["lr"] == pytest.approx(1e-2 * 0.1)
            assert g["forward_mult"] == (0.25 if g["role"] == "output" else 1.0)


def test_weight_decay_is_decoupled_and_applied_once():
    w = torch.nn.Parameter(torch.ones(4, 4))
    base = torch.optim.AdamW([{"params": [w], "lr": 0.1, "weight_decay": 0.5, "role": "hidden"}])
    opt = SpectralNormalized(base)
    w.grad = torch.zeros(4, 4)  # no direction: only the decay moves w
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - 0.1 * 0.5))
    assert base.param_groups[0]["weight_decay"] == 0.5


def test_state_dict_round_trip_resumes_exactly():
    a, b = model(0), model(7)
    opt_a = smup.build_optimizer("adamw", a, P, lr=1e-2, spectral_normalize=True)
    train(a, opt_a, 4)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = smup.build_optimizer("adamw", b, P, lr=1e-2, spectral_normalize=True)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.base.state is opt_b.state
    train(a, opt_a, 3, seed=9)
    train(b, opt_b, 3, seed=9)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
