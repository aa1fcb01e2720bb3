"""Shampoo: oracle parity (pytorch-optimizer, the 2018 algorithm) and identities."""

import io

import pytest
import torch
from pytorch_optimizer import Shampoo as OracleShampoo

from spectral_mup.optim import Shampoo
from spectral_mup.optim.shampoo import inverse_root

F64 = torch.float64
SHAPES = [(24, 16), (16, 40), (12, 12)]


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    return init, targets


def grads(params, targets):
    return [(p - t) + 0.1 * torch.sin(3 * p) for p, t in zip(params, targets, strict=True)]


def run(make, steps=25, seed=0):
    init, targets = problem(seed)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    history = []
    for _ in range(steps):
        for p, g in zip(params, grads([p.detach() for p in params], targets), strict=True):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def max_diff(a, b):
    return max(
        (x - y).abs().max().item()
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa, sb, strict=True)
    )


def test_matches_pytorch_optimizer_shampoo_fp64():
    """e = 1/4, summed factors, no blocking or grafting: Gupta et al. 2018 exactly."""
    ours = run(lambda ps: Shampoo(ps, lr=0.05, epsilon=1e-6))
    oracle = run(lambda ps: OracleShampoo(ps, lr=0.05, matrix_eps=1e-6))
    assert max_diff(ours, oracle) <= 1e-8
    assert max_diff(ours, [run(lambda ps: Shampoo(ps, lr=0.0))[0]] * 25) > 0.1  # it moves


def test_never_started_with_adam_grafting_is_adamw():
    ours = run(
        lambda ps: Shampoo(
            ps,
            lr=0.01,
            betas=(0.9, 1.0),
            grafting="adam",
            grafting_beta2=0.999,
            grafting_eps=1e-8,
            weight_decay=0.1,
            start_preconditioning_step=10**9,
        )
    )
    adamw = run(
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    )
    assert max_diff(ours, adamw) <= 1e-12


def test_blocked_equals_independent_blocks():
    """block_size 8 on a (24, 16) matrix = six independent 8×8 Shampoos."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(24, 16, generator=gen, dtype=F64)
    target = torch.randn(24, 16, generator=gen, dtype=F64)
    whole = torch.nn.Parameter(w0.clone())
    parts = [
        torch.nn.Parameter(w0[r : r + 8, c : c + 8].clone()) for r in (0, 8, 16) for c in (0, 8)
    ]
    opt_whole = Shampoo([whole], lr=0.05, epsilon=1e-8, block_size=8, grafting="adam")
    opt_parts = Shampoo(parts, lr=0.05, epsilon=1e-8, grafting="adam")
    for _ in range(10):
        g = whole.detach() - target + 0.1 * torch.sin(3 * whole.detach())
        whole.grad = g.clone()
        for k, p in enumerate(parts):
            r, c = divmod(k, 2)
            p.grad = g[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].clone()
        opt_whole.step()
        opt_parts.step()
    rebuilt = torch.cat([torch.cat([parts[2 * r], parts[2 * r + 1]], dim=1) for r in range(3)])
    assert (whole.detach() - rebuilt.detach()).abs().max().item() <= 1e-12


def test_inverse_root_and_exponents():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(10, 30, generator=gen, dtype=F64)
    spd = a @ a.T  # full rank
    quarter = inverse_root(spd, 0.25, 1e-10)
    eye = torch.eye(10, dtype=F64)
    torch.testing.assert_close(
        torch.linalg.matrix_power(quarter, 4) @ (spd + 1e-10 * eye), eye, atol=1e-10, rtol=0
    )
    half = inverse_root(spd + eye, 0.5, 0.0)
    torch.testing.assert_close(half @ half @ (spd + eye), eye, atol=1e-10, rtol=0)


def test_one_step_is_orthogonalized():
    """With one summed step and ε → 0, L^-¼ G R^-¼ = U·Vᵀ (every singular value 1)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(20, 12, dtype=F64))
    w.grad = torch.randn(20, 12, generator=gen, dtype=F64)
    Shampoo([w], lr=1.0, epsilon=1e-14).step()
    s = torch.linalg.svdvals(w.detach())
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grafting", ["none", "sgd", "adagrad", "adam"])
def test_state_dict_round_trip(grafting):
    def make(ps):
        return Shampoo(
            ps,
            lr=0.02,
            betas=(0.9, 0.99),
            block_size=8,
            grafting=grafting,
            precondition_frequency=3,
            start_preconditioning_step=2,
        )

    init, targets = problem(4)
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = make(a)
    for _ in range(5):
        for p, g in zip(a, grads([p.detach() for p in a], targets), strict=True):
            p.grad = g
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = make(b)
    buf = io.BytesIO()  # serialize: an in-memory state_dict shares its tensors
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        for params, opt in ((a, opt_a), (b, opt_b)):
            for p, g in zip(params, grads([p.detach() for p in params], targets), strict=True):
                p.grad = g
            opt.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


def test_chunked_gram_update_matches_the_full_product():
    """blocks.gram_update_ computes x·xᵀ from its upper block triangle (rows ≥ 1024)."""
    from spectral_mup.optim.blocks import gram_update_

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1300, 40, generator=gen, dtype=F64)
    gram = torch.randn(2, 1300, 1300, generator=gen, dtype=F64)
    gram = gram + gram.mT
    expected = 0.9 * gram + 0.1 * x @ x.mT
    gram_update_(gram, x, 0.9, 0.1)
    torch.testing.assert_close(gram, expected, atol=1e-10, rtol=0)
