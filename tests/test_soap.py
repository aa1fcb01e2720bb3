"""SOAP: oracle parity (pytorch-optimizer's SOAP), identities, blocking, precision, state."""

import io

import pytest
import torch
from pytorch_optimizer import SOAP as OracleSOAP

from spectral_mup.optim import SOAP

SHAPES = [(24, 16), (16, 40), (12, 12), (12,), (30,)]


def run(make, steps=30, dtype=torch.float32, shapes=SHAPES, noise=0.5, seed=0):
    """Noisy gradients of a quadratic-plus-sine loss (the noise plays a batch's role: with a
    repeated gradient SOAP's first step would normalize rounding noise, see docs/RULES.md)."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    targets = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    grads_seen = []
    for _ in range(steps):
        grads = []
        for p, t in zip(params, targets, strict=True):
            w = p.detach()
            g = (w - t) + 0.1 * torch.sin(3 * w)
            g = g + noise * torch.randn(w.shape, generator=gen).to(dtype)
            p.grad = g
            grads.append(g.clone())
        grads_seen.append(grads)
        opt.step()
    return [p.detach().clone() for p in params], init, grads_seen


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def test_matches_pytorch_optimizer_soap_fp32():
    """Official algorithm, fp32, 30 steps, refresh every 5, decoupled decay, 1-D parameters."""
    ours, init, _ = run(lambda ps: SOAP(ps, lr=0.01, weight_decay=0.1, precondition_frequency=5))
    oracle, _, _ = run(
        lambda ps: OracleSOAP(ps, lr=0.01, weight_decay=0.1, precondition_frequency=5)
    )
    assert max_diff(ours, oracle) <= 1e-5
    assert max_diff(ours, init) > 0.1  # it moved


def test_identity_basis_is_adam():
    """No preconditioned side (max_precond_dim 0): Adam on the gradients after the first call
    (which only initializes). With ε = 0 SOAP's ε-outside-the-correction form is exact Adam."""
    f64 = torch.float64
    ours, init, grads = run(
        lambda ps: SOAP(ps, lr=0.02, eps=0.0, weight_decay=0.0, max_precond_dim=0), dtype=f64
    )
    params = [torch.nn.Parameter(x.clone()) for x in init]
    adam = torch.optim.Adam(params, lr=0.02, betas=(0.95, 0.95), eps=0.0)
    for step_grads in grads[1:]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        adam.step()
    assert max_diff(ours, [p.detach() for p in params]) <= 1e-12


def test_first_call_only_initializes():
    w = torch.nn.Parameter(torch.randn(6, 4))
    w0 = w.detach().clone()
    opt = SOAP([w], lr=0.1)
    w.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(w.detach(), w0)
    state = opt.state[w]
    assert state["step"].item() == 0
    # the basis diagonalizes the initial statistics, eigenvalues in descending order
    lam = state["QL0"][0].T @ state["GGL0"][0] @ state["QL0"][0]
    off = lam - torch.diag(torch.diagonal(lam))
    assert off.abs().max().item() <= 1e-5 * lam.abs().max().item()
    assert torch.all(torch.diff(torch.diagonal(lam)) <= 1e-6)


@pytest.mark.parametrize(("rows", "cols"), [(24, 16), (20, 12)])
def test_blocked_equals_independent_blocks(rows, cols):
    """block_size 8: each block (full, right/bottom edge, corner) is an independent SOAP."""
    f64 = torch.float64
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(rows, cols, generator=gen, dtype=f64)
    target = torch.randn(rows, cols, generator=gen, dtype=f64)
    cuts = [
        (slice(r, min(r + 8, rows)), slice(c, min(c + 8, cols)))
        for r in range(0, rows, 8)
        for c in range(0, cols, 8)
    ]
    whole = torch.nn.Parameter(w0.clone())
    parts = [torch.nn.Parameter(w0[rs, cs].clone()) for rs, cs in cuts]
    opt_whole = SOAP([whole], lr=0.02, block_size=8, precondition_frequency=3, weight_decay=0.1)
    opt_parts = SOAP(parts, lr=0.02, precondition_frequency=3, weight_decay=0.1)
    for _ in range(12):
        g = whole.detach() - target + 0.3 * torch.randn(rows, cols, generator=gen, dtype=f64)
        whole.grad = g.clone()
        for p, (rs, cs) in zip(parts, cuts, strict=True):
            p.grad = g[rs, cs].clone()
        opt_whole.step()
        opt_parts.step()
    rebuilt = torch.empty_like(w0)
    for p, (rs, cs) in zip(parts, cuts, strict=True):
        rebuilt[rs, cs] = p.detach()
    assert (whole.detach() - rebuilt).abs().max().item() <= 1e-12
    assert (whole.detach() - w0).abs().max().item() > 0.05


def test_bf16_parameters_keep_fp32_state_and_track_fp32():
    """The reference crashes on bf16 parameters; here state stays fp32 and the trajectory
    follows the fp32 one to bf16 rounding."""
    shapes = [(12, 12), (8,)]  # square: no null space whose basis rounding could pick
    ours, _, _ = run(lambda ps: SOAP(ps, lr=0.01), steps=15, dtype=torch.bfloat16, shapes=shapes)
    ref, _, _ = run(lambda ps: SOAP(ps, lr=0.01), steps=15, shapes=shapes)
    assert max_diff(ours, ref) <= 0.05
    w = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = SOAP([w])
    for _ in range(2):
        w.grad = torch.randn(16, 8, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[w]["QL0"].dtype == torch.float32 and w.dtype == torch.bfloat16


def test_state_dict_round_trip_continues_exactly():
    def make(ps):
        return SOAP(ps, lr=0.01, block_size=8, precondition_frequency=4)

    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(20, 12, generator=gen)
    grads = [torch.randn(20, 12, generator=gen) for _ in range(14)]
    a = torch.nn.Parameter(w0.clone())
    opt_a = make([a])
    for g in grads:
        a.grad = g.clone()
        opt_a.step()
    b = torch.nn.Parameter(w0.clone())
    opt_b = make([b])
    for g in grads[:7]:
        b.grad = g.clone()
        opt_b.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    c = torch.nn.Parameter(b.detach().clone())
    opt_c = make([c])
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[7:]:
        c.grad = g.clone()
        opt_c.step()
    assert torch.equal(a.detach(), c.detach())


def test_bad_arguments():
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="betas"):
        SOAP(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="block_size"):
        SOAP(w, block_size=-1)
    with pytest.raises(ValueError, match="precondition_frequency"):
        SOAP(w, precondition_frequency=0)
