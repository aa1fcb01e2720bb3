"""``smup sweep SPEC.toml``: a grid of training runs into a SQLite run store.

A sweep spec is a TOML file with five tables::

    [sweep]
    name = "demo"                      # default: the spec file's stem
    base = "../demo.toml"              # RunConfig TOML every run starts from (relative to
                                       # the spec file); default: the built-in defaults
    store = "runs/sweeps/demo.sqlite"  # default runs/sweeps/NAME.sqlite (relative to the cwd)
    out_dir = "runs/sweeps/demo"       # per-run train dirs OUT/<run_id>/; default runs/sweeps/NAME
    workers = 0                        # runs at once; 0 = auto (min(#runs, cores) locally)
    executor = "local"                 # local | ray (the CLI's --executor wins)
    address = ""                       # Ray cluster address ("" = start a local Ray / RAY_ADDRESS)
    cpus_per_run = 0                   # Ray: CPUs per task; 0 = cluster CPUs // workers, or 1
    keep_weights = false               # keep OUT/<id>/checkpoint.pt and model.pt once stored

    [grid]                             # every key optional; a scalar is one value
    optimizer = ["adamw"]              # optim.name
    arch = ["gpt"]                     # model.arch: gpt | llama (the base config's model keys
                                       # the other architecture lacks must hold defaults)
    param = ["sp", "mup"]              # param.kind
    depth_alpha = [1.0]                # param.depth_alpha, μP only: SP runs use α = 0
    width = [64, 128, 256, 512]        # model.width
    depth = [2]                        # model.depth
    lr = { log2_min = -12, log2_max = -4, step = 1 }   # optim.lr: 2^-12 … 2^-4, or a list
    weight_decay = [0.0]               # optim.weight_decay (a list or a log2 table)
    seed = [0, 1]                      # train.seed
    "param.lr_input" = [0.5, 1, 2]     # any other config key, dotted and quoted (a list,
                                       # or a log2 table for a number)

    [search]                           # optional: random search, on top of the grid
    trials = 16                        # samples, each run at every grid point
    seed = 0                           # of the sampler (same spec, same trials everywhere)
    "optim.lr" = { log2_min = -10, log2_max = -4 }      # log-uniform
    "param.readout_scale" = { min = 0.5, max = 2.0 }    # uniform
    "param.attention_mult" = [0.5, 1, 2]                # one of the values

    [budget]                           # per run
    steps = 300                        # train.max_iters
    # tokens = 1_000_000               # or: max_iters = ceil(tokens / (batch_size·block_size))
    # patience = 100                   # train.patience (early stop)

    [overrides]                        # any RunConfig key, dotted
    "train.eval_interval" = 50

A grid key left out takes the base config's value. A search trial's sampled values are
rounded to 4 significant digits and stored in the run's config; its index is the run's
``trial`` (``--only trial=3``). μP runs scale from the base config's
``param.base_width`` and ``param.base_depth`` (the proxy: tune there, transfer to the
grid's widths and depths), which stay fixed across the grid, as in the seed paper.

Every run's config is built (and so validated by ``RunConfig``) before anything runs or
is written: a bad spec is one ``ConfigError`` and no store. Each run has a deterministic id
(:func:`run_id`: a hash of its config), trains in ``OUT/<id>/`` through
:func:`spectral_mup.train.run` (quietly), and its result becomes one row of the
:class:`~spectral_mup.store.RunStore`, written by this driver only, as the run finishes.
Rerunning a spec skips the ids stored with a result (``ok`` or ``diverged``); a run killed
midway resumes from its last checkpoint (bit-exact), so an interrupted sweep ends with the
same rows as an uninterrupted one. A diverged run is a result (status ``diverged``); a run
that raises is stored as ``failed`` with its error, and the sweep goes on; a rerun retries
the failed runs (fix the cause first) and each retry replaces its failed row.

Executors: ``local`` (a process pool with the cores split between workers; one worker runs
in-process) and ``ray`` (the same run function as a Ray task; results come back to the
driver, which writes the store). On a multi-node Ray cluster, ``out_dir`` must be on a
shared filesystem for killed runs to resume, and every node needs the data
(``SMUP_DATA_DIR`` is passed on to the tasks).

Disk: once a run's result is stored the run never trains again, so its checkpoint and
weights are deleted (``OUT/<id>/result.json``, with the loss history, stays) unless
``keep_weights = true``; a failed run's directory is left as it is, to inspect.
"""

from .driver import SweepSummary, describe, dry_run_lines, row_for, run_sweep, stored_statuses
from .executors import available_cores, execute, run_local, run_ray
from .spec import (
    EXECUTORS,
    GRID_KEYS,
    RUNTIME_KEYS,
    Run,
    SweepSpec,
    canonical_config,
    load_spec,
    near_best,
    restrict,
    run_id,
)

__all__ = [
    "EXECUTORS",
    "GRID_KEYS",
    "RUNTIME_KEYS",
    "Run",
    "SweepSpec",
    "SweepSummary",
    "available_cores",
    "canonical_config",
    "describe",
    "dry_run_lines",
    "execute",
    "load_spec",
    "near_best",
    "restrict",
    "row_for",
    "run_id",
    "run_local",
    "run_ray",
    "run_sweep",
    "stored_statuses",
]
