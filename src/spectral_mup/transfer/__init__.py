"""``smup transfer``: tune a small proxy, train the big target with its hyperparameters.

1. Sweep the proxy: the runs of a sweep spec at the proxy size (its only width and depth,
   or ``--proxy-width``/``--proxy-depth`` when the spec sweeps several).
2. Pick the proxy's best LR per (optimizer, parametrization, α, weight decay): the argmin of
   the seed-mean best val loss, with the report's rules (an LR where a seed diverged is never
   best).
3. Train the target width/depth at that LR under μP, one run per seed of the spec — and,
   with ``sp=True``, SP at the proxy's SP optimum (what a practitioner without μP would do).
4. Print the comparison and write ``transfer_<W>x<D>.json`` next to the store.

Every run goes through the sweep driver, so it lands in the same store (target runs under
the sweep name ``<name>-transfer``), is resumable, and is skipped when already stored.

The package, one concept a module: ``runs`` (the proxy runs of a spec, their runs at the
target and how runs train), ``simple`` (``run_transfer``: steps 1–4), ``tuned``
(``run_tuned_transfer``: every swept HP tuned, SP tuned at the target, the tuning compute
counted) and ``tuning`` (how one side of it is tuned: rerank, LR line, winner, cost).
"""

from .simple import Arm, TransferResult, comparison_lines, run_transfer
from .tuned import Tuned, TunedResult, paired_gaps, run_tuned_transfer

__all__ = [
    "Arm",
    "TransferResult",
    "Tuned",
    "TunedResult",
    "comparison_lines",
    "paired_gaps",
    "run_transfer",
    "run_tuned_transfer",
]
