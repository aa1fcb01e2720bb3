"""The stacked training loop: K runs of one shape trained as one model (``stack.py``),
each with its own ``RunState`` (issue 13: batched sweeps).

Every run gets what ``loop.run`` would give it: its own init (``train.seed``), training and
eval batches, LR schedule, loss ceiling, divergence, patience and grad clipping. Its
optimizer steps either as a slice of one LR-linear optimizer (``slices.SliceLR``) or as
the run's own optimizer on its own model (any optimizer, Sophia's curvature included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import OptimSection, RunConfig
from ..data import load_dataset
from ..fileio import save_torch, write_json
from ..optim import RECORDS, get_spec
from ..parametrize import ALL_HP_MULTIPLIERS
from .checkpoint import RESULT, WEIGHTS, load_stack, save_stack
from .objective import eval_generator, run_losses, sample_labels
from .schedule import lr_factor
from .setup import autocast, build_model, build_run_optimizer
from .slices import clip_per_run, stacked_optimizer
from .stack import NotBatchable, Stacked, stack
from .state import RunState


def _per_run_keys() -> set[tuple[str, str]]:
    """Config keys that may differ between the runs of one stack (everything else must
    match): every optimizer option but its name and Sophia's Hessian cadence (each run has
    its own optimizer; the slices mode needs them equal and otherwise steps per run), the
    seed and run dir, the base init std and the transferable HP multipliers (param groups,
    init, and the forward multipliers as one value per run, ``models.common.PerRun``)."""
    optim = {("optim", f.name) for f in dataclasses.fields(OptimSection)}
    cadence = {("optim", r.curvature.interval) for r in RECORDS if r.curvature}
    return (optim - {("optim", "name"), *cadence}) | {
        ("train", "seed"),
        ("train", "out_dir"),
        *(("param", k) for k in ("init_std", *ALL_HP_MULTIPLIERS)),
    }


PER_RUN_KEYS = _per_run_keys()


def stack_key(cfg: RunConfig) -> str:
    """Runs with equal keys can share a stack: their configs agree outside PER_RUN_KEYS."""
    d = cfg.to_dict()
    kept = {s: {k: v for k, v in items.items() if (s, k) not in PER_RUN_KEYS}
            for s, items in d.items()}  # fmt: skip
    return json.dumps(kept, sort_keys=True, default=str)


def check_stackable(cfgs: Sequence[RunConfig]) -> None:
    """NotBatchable unless the runs can train as one stack (no gradient accumulation, no
    compile, no pause, no dropout, one process; the same shape, data and schedule)."""
    if len({stack_key(c) for c in cfgs}) != 1:
        raise NotBatchable("the runs differ beyond LR, weight decay, seed and multipliers")
    t = cfgs[0].train
    if t.grad_accum != 1 or t.compile or t.stop_at:
        raise NotBatchable("grad_accum > 1, compile or stop_at runs train one by one")
    # a stack draws one dropout mask for all runs' rows: same distribution, other numbers
    if getattr(cfgs[0].model, "dropout", 0.0):
        raise NotBatchable("runs with dropout train one by one (their masks would differ)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotBatchable("stacked runs train in one process, not under torchrun")


class _SliceSteps:
    """Steps of the stacked tensors by one LR-linear optimizer (``SliceLR``)."""

    def __init__(self, stacked: Stacked, opts: Sequence[torch.optim.Optimizer], cfgs):
        self.stacked, self.opt = stacked, stacked_optimizer(stacked, opts)
        self.first_lr = [o.param_groups[0]["lr"] for o in opts]
        self.factors = [lr_factor(cfg) for cfg in cfgs]
        self.clip = cfgs[0].train.grad_clip

    def zero_grad(self) -> None:
        self.opt.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.stacked.state_dict(), "opt": self.opt.opt.state_dict(),
                "steps": self.opt.steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stacked.load_state_dict(state["model"])
        self.opt.opt.load_state_dict(state["opt"])
        self.opt.steps = state["steps"]

    def win_rate(self, i: int) -> float | None:
        return None

    def step(self, it: int, active: torch.Tensor, x: torch.Tensor, forward) -> list[float]:
        if self.clip > 0:
            clip_per_run(self.stacked, self.clip, active)
        now = torch.tensor([f(it) for f in self.factors], dtype=torch.float64)
        self.opt.step(now, active)
        return [lr * float(f) for lr, f in zip(self.first_lr, now, strict=True)]


class _RunSteps:
    """Each run's own optimizer and LR schedule on its own model (``stack(leaves=True)``),
    as ``loop.run`` steps them: any optimizer, Sophia's Hessian estimates included."""

    def __init__(self, stacked: Stacked, opts: Sequence[torch.optim.Optimizer], cfgs, rngs):
        self.stacked, self.opts = stacked, list(opts)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(c))
                       for o, c in zip(opts, cfgs, strict=True)]  # fmt: skip
        self.clip = cfgs[0].train.grad_clip
        self.rngs = rngs  # each run's global-RNG stream (Sophia draws its labels' uniforms)
        self.every = get_spec(cfgs[0].optim.name).curvature_interval(opts[0])

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": [m.state_dict() for m in self.stacked.singles],
            "opts": [o.state_dict() for o in self.opts],
            "scheds": [s.state_dict() for s in self.scheds],
            "rngs": [g.get_state() for g in self.rngs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, o, sched, g, ms, os_, ss, gs in zip(
            self.stacked.singles, self.opts, self.scheds, self.rngs, state["models"],
            state["opts"], state["scheds"], state["rngs"], strict=True,
        ):  # fmt: skip
            m.load_state_dict(ms)
            o.load_state_dict(os_)
            sched.load_state_dict(ss)
            g.set_state(gs)

    def win_rate(self, i: int) -> float | None:
        return self.opts[i].last_win_rate if self.every else None

    def _clip(self, i: int) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.stacked.singles[i].parameters(), self.clip)

    def step(self, it: int, active: torch.Tensor, x: torch.Tensor, forward) -> list[float]:
        lrs = []
        for i, (o, sched) in enumerate(zip(self.opts, self.scheds, strict=True)):
            lrs.append(sched.get_last_lr()[0])
            if active[i]:
                self._clip(i)
                o.step()
        if self.every and it % self.every == self.every - 1:
            self._hessian(active, x, forward)
        for i, sched in enumerate(self.scheds):
            if active[i]:
                sched.step()
        return lrs

    def _hessian(self, active: torch.Tensor, x: torch.Tensor, forward) -> None:
        """objective.update_hessian for every active run at once: labels sampled from each
        run's own predictions with uniforms from its own RNG stream."""
        k = self.stacked.k
        u = torch.stack([torch.rand(x.shape[1:], generator=g) for g in self.rngs]).to(x.device)
        self.zero_grad()
        logits = forward(x).float()
        flat = logits.reshape(k, -1, logits.size(-1))
        per = run_losses(flat, sample_labels(flat, u.reshape(k, -1)), k)
        per.masked_fill(~active.to(per.device), 0.0).sum().backward()
        for i, o in enumerate(self.opts):
            if active[i]:
                self._clip(i)
                o.update_hessian()
        self.zero_grad()


def _steps(cfgs: Sequence[RunConfig], mode: str, vocab_size: int, device: torch.device):
    """Each run's model and optimizer, stacked and stepped as ``mode`` says."""
    singles, opts, rngs = [], [], []
    for cfg in cfgs:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, vocab_size).to(device)
        singles.append(model)
        opts.append(build_run_optimizer(cfg, model))
        rngs.append(torch.Generator().set_state(torch.get_rng_state()))
    if mode in ("auto", "slices"):
        try:  # one LR-linear optimizer with the runs' shared options, or NotBatchable
            return _SliceSteps(stack(singles).to(device), opts, cfgs)
        except NotBatchable:
            if mode == "slices":
                raise
    return _RunSteps(stack(singles, leaves=True).to(device), opts, cfgs, rngs)


class _StackRun:
    """The stacked loop's state: the stack, its steps, each run's data RNG and RunState."""

    def __init__(self, cfgs: Sequence[RunConfig], mode: str, checkpoint: str | Path | None):
        check_stackable(cfgs)
        self.cfgs, self.k, self.t = cfgs, len(cfgs), cfgs[0].train
        self.device = torch.device(self.t.device)
        c0 = cfgs[0]
        self.data = load_dataset(c0.data.path or None, vocab_size=c0.data.vocab_size or None)
        self.steps = _steps(cfgs, mode, self.data.vocab_size, self.device)
        self.stacked = self.steps.stacked
        self.gens = [torch.Generator().manual_seed(cfg.train.seed) for cfg in cfgs]
        self.states = [RunState.of(cfg, self.data.vocab_size) for cfg in cfgs]
        self.names = [str(cfg.train.out_dir) for cfg in cfgs]
        self.first, self.elapsed0 = 0, 0.0
        self.ckpt_path = Path(checkpoint) if checkpoint is not None else None
        if self.ckpt_path is not None and self.ckpt_path.exists():
            self._restore(load_stack(self.ckpt_path))

    def _restore(self, saved: dict[str, Any]) -> None:
        if saved.get("runs") != self.names:
            return
        self.steps.load_state_dict(saved["steps"])
        for g, state in zip(self.gens, saved["gens"], strict=True):
            g.set_state(state)
        for s, run in zip(self.states, saved["states"], strict=True):
            s.load_state_dict(run["state"], run["history"])
        self.first, self.elapsed0 = saved["it"], saved["elapsed"]

    def save(self, done: int, start: float) -> None:
        save_stack(self.ckpt_path, {
            "runs": self.names, "it": done, "steps": self.steps.state_dict(),
            "gens": [g.get_state() for g in self.gens],
            "states": [{"state": s.state_dict(), "history": s.history} for s in self.states],
            "elapsed": self.elapsed0 + time.perf_counter() - start,
        })  # fmt: skip

    def active(self) -> torch.Tensor:
        return torch.tensor([s.active for s in self.states], dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfgs[0]):
            return self.stacked(x.to(self.device))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return run_losses(self.forward(x), y.to(self.device), self.k)

    def batch(self, split: str, gens: Sequence[torch.Generator]):
        xy = [self.data.get_batch(split, self.t.batch_size, self.cfgs[0].model.block_size, g)
              for g in gens]  # fmt: skip
        return torch.stack([a for a, _ in xy]), torch.stack([b for _, b in xy])

    def evaluate(self) -> list[float]:
        egens = [eval_generator(cfg) for cfg in self.cfgs]
        total = torch.zeros(self.k, dtype=torch.float64)
        self.stacked.eval()
        with torch.no_grad():
            for _ in range(self.t.eval_iters):
                total += self.losses(*self.batch("val", egens)).double().cpu()
        self.stacked.train()
        return (total / self.t.eval_iters).tolist()

    def step(self, it: int) -> bool:
        """One step of every active run; False when no run is left."""
        x, y = self.batch("train", self.gens)
        self.steps.zero_grad()
        per_run = self.losses(x, y)
        values = per_run.detach().double().cpu().tolist()
        for s, v in zip(self.states, values, strict=True):
            if s.active:
                s.check_train_loss(v)
        active = self.active()
        if not active.any():
            return False
        per_run.masked_fill(~active.to(per_run.device), 0.0).sum().backward()
        lrs = self.steps.step(it, active, x, self.forward)
        for s, lr, v in zip(self.states, lrs, values, strict=True):
            if s.active:
                s.record_step(lr, v)
        return True

    def eval(self) -> None:
        vals = self.evaluate()
        for i, s in enumerate(self.states):
            if s.active:
                s.record_eval(vals[i], self.steps.win_rate(i))

    def train(self) -> None:
        t = self.t
        ckpt_every = t.checkpoint_interval or t.eval_interval
        start = time.perf_counter()
        self.stacked.train()
        for it in range(self.first, t.max_iters):
            if not self.active().any() or not self.step(it):
                break
            done = it + 1
            if done % t.eval_interval == 0 or done == t.max_iters:
                self.eval()
            if self.ckpt_path is not None and done % ckpt_every == 0 and done < t.max_iters:
                self.save(done, start)
        self.elapsed = self.elapsed0 + time.perf_counter() - start

    def results(self) -> list[dict[str, Any]]:
        """Write and return each run's result (and weights, for an ``ok`` run)."""
        results = []
        num_params = sum(q.numel() for q in self.stacked.run_state(0).values())
        for i, (cfg, s) in enumerate(zip(self.cfgs, self.states, strict=True)):
            s.finish()
            out = Path(cfg.train.out_dir)
            result = s.result(cfg, num_params=num_params, data=self.data.source,
                              wall_time=self.elapsed / self.k, stacked=self.k)  # fmt: skip
            if s.status == "ok":
                save_torch(out / WEIGHTS, self.stacked.run_state(i))
            write_json(out / RESULT, result)
            results.append(result)
        if self.ckpt_path is not None:
            self.ckpt_path.unlink(missing_ok=True)
        return results


def train_stacked(
    cfgs: Sequence[RunConfig], *, mode: str = "auto", checkpoint: str | Path | None = None
) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (``check_stackable``) as one stack; return and write
    (``out_dir/result.json``, and ``model.pt`` for an ``ok`` run) each run's result, as
    ``loop.run`` would (module docstring). A diverged or stopped run is masked out (its
    weights stay) while the others go on. Each result's ``wall_time`` is the stack's
    divided by K (the compute is shared).

    ``checkpoint``: a file the stack saves itself to at every eval (or
    ``train.checkpoint_interval``) and resumes from, bit for bit, when it exists and holds
    the same runs; deleted once every result is written. Without it a killed stack starts
    over.

    ``mode``: ``"slices"`` steps the stacked tensors with one LR-linear optimizer
    (``SliceLR``: AdamW, Adam, Lion, SGD, ADOPT; NotBatchable for any other), ``"runs"``
    steps each run's own optimizer on its own model (every optimizer), ``"auto"`` slices
    when the optimizer allows it."""
    if mode not in ("auto", "slices", "runs"):
        raise ValueError(f"mode must be auto, slices or runs, got {mode!r}")
    run = _StackRun(cfgs, mode, checkpoint)
    run.train()
    return run.results()
