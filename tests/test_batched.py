"""Stacked runs (spectral_mup.train.stack, .slices, .stacked) against K separate models
and optimizers: the same outputs and, step by step, the same weights (float64, so any
difference is a bug, not rounding)."""

import pytest
import torch
import torch.nn.functional as F

from spectral_mup import Parametrization, build_optimizer
from spectral_mup.models import GPT, GPTConfig, Llama, LlamaConfig
from spectral_mup.train.slices import stacked_optimizer
from spectral_mup.train.stack import NotBatchable, stack

SHAPE = dict(width=32, depth=2, n_heads=2, vocab_size=65, block_size=16)


def models(arch, ps, seeds, **shape):
    cls, cfg = (GPT, GPTConfig) if arch == "gpt" else (Llama, LlamaConfig)
    out = []
    for p, seed in zip(ps, seeds, strict=True):
        torch.manual_seed(seed)
        out.append(cls(cfg(**SHAPE, **shape), p).double())
    return out


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize(
    "hps",
    [
        ({}, {"readout_scale": 1.0}, {}),
        # forward multipliers of their own: one value per run in the stack (PerRun)
        ({}, {"readout_scale": 0.5, "attention_mult": 2.0}, {"attention_mult": 0.7}),
    ],
)
def test_stacked_forward_is_each_runs_forward(arch, hps):
    ps = [Parametrization(base_width=16, **hp) for hp in hps]
    singles = models(arch, ps, seeds=(0, 1, 2))
    stacked = stack(singles)
    x = torch.randint(0, 65, (3, 4, 16))
    got = stacked(x)
    for k, m in enumerate(singles):
        torch.testing.assert_close(got[k], m(x[k]), rtol=0, atol=1e-12)
    assert set(stacked.run_state(1)) == set(dict(singles[1].named_parameters()))
    head = "lm_head.weight" if arch == "gpt" else "output.weight"
    torch.testing.assert_close(
        stacked.run_state(2)[head], dict(singles[2].named_parameters())[head]
    )


@pytest.mark.parametrize(
    ("optimizer", "kw"),
    [("adamw", {}), ("lion", {}), ("sgd", {"momentum": 0.9}), ("adopt", {})],
)
def test_stacked_steps_are_each_runs_steps(optimizer, kw):
    """Three runs with their own LR, weight decay, per-role LR multiplier, init seed and
    batches, and their own schedule factor per step, for 4 steps."""
    ps = [Parametrization(base_width=16, **hp)
          for hp in ({}, {"lr_input": 4.0, "lr_vector": 0.5}, {"lr_output": 2.0})]  # fmt: skip
    lrs, wds = (1e-3, 3e-3, 2e-4), (0.0, 0.1, 0.3)
    if optimizer == "sgd":
        lrs = (0.1, 0.3, 0.03)
    # Lion: no biases — a key bias's gradient is 0 in exact arithmetic, so the sign of its
    # rounding noise (which batching changes) is arbitrary
    singles = models("gpt", ps, seeds=(0, 1, 2), bias=optimizer != "lion")
    stacked = stack(singles)
    opts = [build_optimizer(optimizer, m, p, lr, wd, **kw)
            for m, p, lr, wd in zip(singles, ps, lrs, wds, strict=True)]  # fmt: skip
    batched = stacked_optimizer(stacked, opts)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = torch.randint(0, 65, (3, 4, 16), generator=gen)
        y = torch.randint(0, 65, (3, 4, 16), generator=gen)
        factors = torch.tensor([1.0, 0.5 + 0.1 * step, 0.8])
        for k, (m, o) in enumerate(zip(singles, opts, strict=True)):
            for g in o.param_groups:
                g["lr"] = g.setdefault("initial", g["lr"]) * float(factors[k])
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[k]).view(-1, 65), y[k].view(-1)).backward()
            o.step()
        batched.opt.zero_grad(set_to_none=True)
        logits = stacked(x)
        per_run = F.cross_entropy(logits.reshape(-1, 65), y.reshape(-1), reduction="none")
        per_run.view(3, -1).mean(1).sum().backward()
        batched.step(factors)
    for k, m in enumerate(singles):
        state = stacked.run_state(k)
        for name, q in m.named_parameters():
            torch.testing.assert_close(state[name], q.detach(), rtol=1e-9, atol=1e-12, msg=name)


def test_inactive_runs_keep_their_weights_and_unsupported_models_are_refused():
    ps = [Parametrization(base_width=16)] * 2
    singles = models("gpt", ps, seeds=(0, 1))
    stacked = stack(singles)
    opts = [build_optimizer("adamw", m, p, 1e-2) for m, p in zip(singles, ps, strict=True)]
    batched = stacked_optimizer(stacked, opts)
    before = stacked.run_state(1)
    x = torch.randint(0, 65, (2, 2, 16))
    stacked(x).sum().backward()
    batched.step(torch.ones(2), active=torch.tensor([True, False]))
    after = stacked.run_state(1)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not torch.equal(stacked.run_state(0)["wte.weight"], singles[0].wte.weight)
    other = models("gpt", ps, seeds=(0, 1))
    other[1].ln_f.eps = 1e-3  # a number the stack would take from the first run
    with pytest.raises(NotBatchable, match=r"ln_f\.eps differs between the runs"):
        stack(other)
    tied = [GPT(GPTConfig(**SHAPE, tie_weights=True), Parametrization(base_width=16))] * 2
    with pytest.raises(NotBatchable, match="tied"):
        stack(tied)
    muon = [build_optimizer("muon", m, p, 1e-2) for m, p in zip(singles, ps, strict=True)]
    with pytest.raises(NotBatchable, match="Muon steps are not batched"):
        stacked_optimizer(stacked, muon)


def test_train_stacked_gives_each_runs_result(tmp_path):
    """train_stacked against train.run on each config: status, divergence step, iterations
    and losses (float32: batched matmuls round differently; measured ≤ 4e-8 relative at 1
    and 2 threads, bound 1e-4), and each run's result.json and weights."""
    import json

    got, want = _stack_vs_single(tmp_path, "adamw", (0.004, 0.016, 50.0), "auto")
    for g, w in zip(got, want, strict=True):
        assert (g["status"], g["diverged_at"], g["iters"]) == (
            w["status"],
            w["diverged_at"],
            w["iters"],
        )
        for key in ("best_val_loss", "final_val_loss", "final_train_loss"):
            if w[key] is None:
                assert g[key] is None
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-4), key
    assert [r["status"] for r in got] == ["ok", "ok", "diverged"]
    saved = json.loads((tmp_path / "stacked" / "1" / "result.json").read_text())
    assert saved["best_val_loss"] == got[1]["best_val_loss"] and saved["stacked"] == 3
    weights = torch.load(tmp_path / "stacked" / "0" / "model.pt")
    single = torch.load(tmp_path / "single" / "0" / "model.pt")
    for name, q in single.items():  # the key bias: 0 gradient in exact arithmetic, AdamW
        if name.endswith("c_attn.bias"):  # moves it by the sign of rounding noise
            continue
        torch.testing.assert_close(weights[name], q, rtol=1e-3, atol=1e-5, msg=name)


def _configs(root, optimizer="adamw", lrs=(0.004, 0.016, 50.0), per_run=({}, {}, {})):
    """Three tiny runs, each with its own LR, decay (0, 0.1, 0), seed (0, 1, 2) and
    ``per_run`` [optim] options, training in ``root/0``, ``root/1``, ``root/2``; at LR 50
    AdamW diverges."""
    from spectral_mup.config import build_config, load_config

    base = load_config(None).to_dict()
    base["model"].update(width=16, depth=1, n_heads=2, block_size=16)
    base["param"].update(base_width=16, base_depth=1)
    base["optim"]["name"] = optimizer
    base["train"].update(batch_size=4, max_iters=30, eval_interval=10, eval_iters=2,
                         warmup_iters=3, progress=False, patience=0)  # fmt: skip
    cfgs = []
    for i, (lr, wd) in enumerate(zip(lrs, (0.0, 0.1, 0.0), strict=True)):
        values = {s: dict(v) for s, v in base.items()}
        values["optim"].update(lr=lr, weight_decay=wd)
        for key, value in per_run[i].items():  # an [optim] option, or "section.key"
            section, _, name = key.rpartition(".")
            values[section or "optim"][name] = value
        values["train"].update(seed=i, out_dir=str(root / str(i)))
        cfgs.append(build_config(values))
    return cfgs


def _stack_vs_single(tmp_path, optimizer, lrs, mode, per_run=({}, {}, {})):
    """The three runs of ``_configs`` through train.run and as one stack."""
    from spectral_mup.train import run, train_stacked

    want = [run(c, log=None) for c in _configs(tmp_path / "single", optimizer, lrs, per_run)]
    cfgs = _configs(tmp_path / "stacked", optimizer, lrs, per_run)
    return train_stacked(cfgs, mode=mode), want


@pytest.mark.parametrize(
    ("optimizer", "lrs", "rel"),
    [
        # measured max relative difference of best/final val and final train loss at 1 and
        # 2 threads in brackets; the bound leaves ≥ 10× room
        ("adamw", (0.004, 0.016, 50.0), 1e-5),  # [4.1e-8]
        ("sophia", (0.004, 0.016, 50.0), 1e-5),  # [3.5e-8] Hessian labels from each run's RNG
        ("lamb", (0.004, 0.016, 50.0), 1e-5),  # [1.2e-7]
        ("shampoo", (0.01, 0.04, 500.0), 2e-4),  # [1.2e-5]
        ("soap", (0.004, 0.016, 50.0), 3e-3),  # [1.7e-4] eigenbases amplify rounding
        ("muon", (0.01, 0.04, 0.02), 1e-5),  # [5.9e-8] (at LR 500 it runs on, chaotic)
    ],
)
def test_stacked_runs_mode_steps_each_runs_own_optimizer(tmp_path, optimizer, lrs, rel):
    """mode="runs": each run's own optimizer (any class) and LR schedule on its own model
    inside the stack; results equal train.run's per run, divergence included."""
    got, want = _stack_vs_single(tmp_path, optimizer, lrs, "runs")
    for g, w in zip(got, want, strict=True):
        assert (g["status"], g["diverged_at"], g["iters"]) == (
            w["status"], w["diverged_at"], w["iters"]
        )  # fmt: skip
        for key in ("best_val_loss", "final_val_loss", "final_train_loss"):
            if w[key] is None:
                assert g[key] is None
            else:
                assert g[key] == pytest.approx(w[key], rel=rel), key
        assert g["history"]["lr"] == pytest.approx(w["history"]["lr"], rel=1e-12)
    if optimizer != "muon":
        assert [r["status"] for r in got] == ["ok", "ok", "diverged"]


@pytest.mark.parametrize("mode", ["slices", "runs"])
def test_a_killed_stack_resumes_from_its_checkpoint_bit_for_bit(tmp_path, monkeypatch, mode):
    """A stack killed right after its second checkpoint (step 20 of 30) resumes from it:
    the same results as an uninterrupted stack, to the bit; the checkpoint is deleted at
    the end. A checkpoint of other runs is ignored (the stack starts over)."""
    import spectral_mup.train.stacked as B
    from spectral_mup.train.checkpoint import STACK_FORMAT

    want = B.train_stacked(_configs(tmp_path / "clean"), mode=mode)
    ckpt = tmp_path / "stack.pt"
    save, saves, kill = B.save_stack, [], [True]

    def killed_after_two(path, state):
        save(path, state)
        saves.append(state["it"])
        if kill[0] and len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(B, "save_stack", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        B.train_stacked(_configs(tmp_path / "killed"), mode=mode, checkpoint=ckpt)
    assert saves == [10, 20] and ckpt.exists()
    saves.clear()
    kill[0] = False
    got = B.train_stacked(_configs(tmp_path / "killed"), mode=mode, checkpoint=ckpt)
    assert saves == [] and not ckpt.exists()  # resumed at 20: nothing left to checkpoint
    for g, w in zip(got, want, strict=True):
        for key in ("status", "iters", "diverged_at", "best_val_loss", "final_val_loss",
                    "final_train_loss", "history"):  # fmt: skip
            assert g[key] == w[key], key
    assert [r["status"] for r in got] == ["ok", "ok", "diverged"]

    other = _configs(
        tmp_path / "other"
    )  # another stack's checkpoint: ignored, the stack starts over
    save(ckpt, {"format": STACK_FORMAT, "runs": ["x"], "it": 20})
    again = B.train_stacked(other, mode=mode, checkpoint=ckpt)
    assert saves == [10, 20]
    assert [r["best_val_loss"] for r in again] == [r["best_val_loss"] for r in want]


def test_runs_with_their_own_optimizer_options_stack_per_run(tmp_path):
    """AdamW runs whose betas and ε differ share a stack (train.stacked.PER_RUN_KEYS): auto
    cannot slice them (one optimizer, one set of options), so each run's own optimizer
    steps it; results equal train.run's (measured ≤ 3.4e-8 relative, 1 and 2 threads)."""
    from spectral_mup.config import load_config, replace
    from spectral_mup.train.stacked import check_stackable, stack_key

    per_run = ({}, {"betas": (0.8, 0.99), "eps": 1e-6}, {"eps": 1e-10})
    got, want = _stack_vs_single(tmp_path, "adamw", (0.004, 0.016, 0.008), "auto", per_run)
    for g, w in zip(got, want, strict=True):
        assert g["status"] == w["status"] == "ok"
        for key in ("best_val_loss", "final_val_loss", "final_train_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), key
    assert len({g["best_val_loss"] for g in got}) == 3
    a = load_config(None)
    b = replace(a, optim={"eps": 1e-6}, param={"init_std": 0.04, "readout_scale": 2.0,
                                                "attention_mult": 0.5})  # fmt: skip
    assert stack_key(a) == stack_key(b)
    check_stackable([a, b])
    with pytest.raises(NotBatchable, match="differ beyond"):
        check_stackable([a, replace(a, param={"depth_alpha": 0.5})])


@pytest.mark.parametrize(("optimizer", "mode"), [("adamw", "slices"), ("muon", "runs")])
def test_runs_with_their_own_forward_multipliers_share_a_stack(tmp_path, optimizer, mode):
    """Runs that differ in the readout constant and attention temperature (a random
    search's trials) train as one stack; results equal train.run's (measured max relative
    difference 1.0e-7 AdamW, 5.9e-8 Muon, 1 and 2 threads; the bound leaves 100×)."""
    per_run = ({"param.readout_scale": 0.5, "param.attention_mult": 2.0},
               {}, {"param.attention_mult": 0.6, "param.readout_scale": 3.0})  # fmt: skip
    got, want = _stack_vs_single(tmp_path, optimizer, (0.004, 0.016, 0.008), mode, per_run)
    for g, w in zip(got, want, strict=True):
        assert g["status"] == w["status"] == "ok"
        for key in ("best_val_loss", "final_val_loss", "final_train_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), key
