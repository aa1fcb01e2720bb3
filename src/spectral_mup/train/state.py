"""One run's progress: its history, best validation loss, divergence, patience and stop,
and the result it ends with. The single-run loop (``loop.py``) keeps one ``RunState``, the
stacked loop (``stacked.py``) one per run: divergence and patience are decided here only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig


def _history() -> dict[str, list]:
    return {"train_loss": [], "lr": [], "val": [], "win_rate": []}


@dataclass
class RunState:
    """``ceiling``: a loss above it (or non-finite) is divergence; ``patience``: stop when
    the validation loss has not improved for this many iterations (0: never)."""

    ceiling: float
    patience: int = 0
    history: dict[str, list] = field(default_factory=_history)
    iter: int = 0
    best_val: float = math.inf
    best_iter: int = 0
    status: str = "ok"  # ok | diverged
    stop_reason: str | None = None  # diverged | early_stop | max_iters, once stopped
    diverged_at: int | None = None
    elapsed: float = 0.0  # seconds of training so far (checkpointed, so resumes add to it)
    eval_time: float = 0.0  # of elapsed: the evaluations

    @classmethod
    def of(cls, cfg: RunConfig, vocab_size: int) -> RunState:
        """A fresh state for ``cfg``: its ceiling (``train.loss_ceiling``, or 2·ln(vocab))
        and patience."""
        t = cfg.train
        return cls(t.loss_ceiling or 2.0 * math.log(vocab_size), t.patience)

    @property
    def active(self) -> bool:
        return self.stop_reason is None

    def diverges(self, loss: float) -> bool:
        return not math.isfinite(loss) or loss > self.ceiling

    def _diverged(self, it: int) -> None:
        self.status = self.stop_reason = "diverged"
        self.diverged_at = it

    def check_train_loss(self, loss: float) -> bool:
        """Before the step from iteration ``self.iter``: False (and the run diverged there)
        when its training loss is non-finite or above the ceiling."""
        if self.diverges(loss):
            self._diverged(self.iter)
            return False
        return True

    def record_step(self, lr: float, loss: float) -> None:
        """One step taken at LR ``lr`` on a batch of training loss ``loss``."""
        self.history["lr"].append(lr)
        self.history["train_loss"].append(loss)
        self.iter += 1

    def record_eval(self, val: float, win_rate: float | None = None) -> str | None:
        """A validation loss at the current iteration; returns why the run stops now
        (``"diverged"``, ``"early_stop"``) or None."""
        it = self.iter
        self.history["val"].append([it, val])
        if win_rate is not None:
            self.history["win_rate"].append([it, win_rate])
        if val < self.best_val:
            self.best_val, self.best_iter = val, it
        if self.diverges(val):
            self._diverged(it)
        elif self.patience and it - self.best_iter >= self.patience:
            self.stop_reason = "early_stop"
        return self.stop_reason

    def finish(self) -> None:
        """A run that went its whole course stops for ``max_iters``."""
        if self.stop_reason is None:
            self.stop_reason = "max_iters"

    # ------------------------------------------------------------------ checkpoint form

    def state_dict(self) -> dict[str, Any]:
        """Everything but the history (a checkpoint stores that beside it)."""
        return {
            "iter": self.iter,
            "best_val": self.best_val,
            "best_iter": self.best_iter,
            "elapsed": self.elapsed,
            "stop_reason": self.stop_reason,
            "eval_time": self.eval_time,
            "status": self.status,
            "diverged_at": self.diverged_at,
        }

    def load_state_dict(self, state: dict[str, Any], history: dict[str, list]) -> None:
        self.history = history
        self.iter, self.best_val, self.best_iter = (
            state["iter"],
            state["best_val"],
            state["best_iter"],
        )
        self.elapsed, self.stop_reason = state["elapsed"], state["stop_reason"]
        self.eval_time = state.get("eval_time", 0.0)
        self.status = state.get("status", "ok")
        self.diverged_at = state.get("diverged_at")

    # ------------------------------------------------------------------------- result

    def result(
        self,
        cfg: RunConfig,
        *,
        num_params: int,
        data: str,
        wall_time: float,
        stop_reason: str | None = None,
        eval_time: float | None = None,
        stacked: int | None = None,
    ) -> dict[str, Any]:
        """The run's result (``result.json``). ``stop_reason``: instead of the state's
        (``"stop_at"``: paused); ``eval_time``: of ``wall_time``, the evaluations;
        ``stacked``: the number of runs of its stack."""
        train_loss = self.history["train_loss"]
        tail = train_loss[-min(len(train_loss), cfg.train.eval_interval) :]
        final_val = self.history["val"][-1][1] if self.history["val"] else None
        result = {
            "status": self.status,
            "stop_reason": stop_reason or self.stop_reason or "max_iters",
            "iters": self.iter,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "best_iter": self.best_iter,
            "final_val_loss": final_val
            if final_val is not None and math.isfinite(final_val)
            else None,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "diverged_at": self.diverged_at,
            "tokens": self.iter * cfg.train.batch_size * cfg.model.block_size,
            "wall_time": wall_time,
            **({} if eval_time is None else {"eval_time": eval_time}),
            "num_params": num_params,
            "data": data,
            "config": cfg.to_dict(),
            "history": self.history,
        }
        if stacked is not None:
            result["stacked"] = stacked
        return result
