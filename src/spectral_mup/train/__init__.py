"""Training: one run (``loop.run``), K runs of one shape as one stack
(``stacked.train_stacked``), and what both share — a ``RunState`` per run (history, best,
divergence, patience, result), the objective (loss, evaluation, Sophia's sampled labels),
the LR schedule, the run's setup (model, optimizer, FLOPs) and its checkpoints."""

from ..config import LATER_KEYS, RUNTIME_KEYS, fingerprint
from ..config import optimizer_options as run_optimizer_options
from .checkpoint import CHECKPOINT, RESULT, SHARDED, WEIGHTS, load_checkpoint
from .loop import run
from .objective import eval_generator, evaluate, loss_fn, update_hessian
from .schedule import lr_factor
from .setup import (
    build_model,
    build_run_optimizer,
    flops_per_token,
    keep_freed_memory,
)
from .stack import NotBatchable
from .stacked import train_stacked
from .state import RunState

__all__ = [
    "CHECKPOINT", "LATER_KEYS", "RESULT", "RUNTIME_KEYS", "SHARDED", "WEIGHTS", "NotBatchable",
    "RunState", "build_model", "build_run_optimizer", "eval_generator", "evaluate",
    "fingerprint", "flops_per_token", "keep_freed_memory", "load_checkpoint", "loss_fn",
    "lr_factor", "run", "run_optimizer_options", "train_stacked", "update_hessian",
]  # fmt: skip
