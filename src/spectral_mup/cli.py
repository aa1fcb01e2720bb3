"""The ``smup`` command line. User mistakes end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, SmupError, import_object


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _kinds(text: str) -> list[str]:
    kinds = [v.strip() for v in text.split(",") if v.strip()]
    bad = [k for k in kinds if k not in ("sp", "mup")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"--param takes sp, mup or sp,mup; got {text!r}")
    return kinds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smup", description="Zero-shot hyperparameter transfer (μP) for every LLM optimizer."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one model from a TOML config",
        description="Train one model. Override any key with --section.key VALUE "
        "(or --key VALUE when the key is unique), e.g. --optim.lr 0.01.",
    )
    train.add_argument("config", help="TOML config file (see configs/)")

    cc = sub.add_parser("coord-check", help="coordinate check over widths and/or depths, SP vs μP")
    cc.add_argument("--optimizer", default="adamw")
    cc.add_argument("--lr", type=float, default=None, help="base LR (default: per optimizer)")
    cc.add_argument(
        "--adam-lr", type=float, default=None, help="Muon: base LR of its AdamW part (default 3e-3)"
    )
    cc.add_argument("--shape-factor", default=None, help="Muon: spectral | original | moonlight")
    cc.add_argument(
        "--spectral-normalize",
        action="store_true",
        help="wrap the optimizer in SpectralNormalized (RULES.md §6)",
    )
    cc.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an optimizer option (an [optim] key), e.g. --opt block_size=128 --opt grafting=adam",
    )
    cc.add_argument("--arch", default="gpt", help="bundled model: gpt | llama")
    cc.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [model] key of --arch at the smallest size, e.g. --model n_kv_heads=1 "
        "--model fused=true (head_dim=16: heads added with width)",
    )
    cc.add_argument("--param", type=_kinds, default=["sp", "mup"], help="sp,mup")
    cc.add_argument("--widths", type=_ints, default=None, help="e.g. 64,128,256,512")
    cc.add_argument(
        "--depths", type=_ints, default=None, help="e.g. 2,4,8,16 (μP, per --depth-alpha)"
    )
    cc.add_argument(
        "--depth-alpha",
        type=_floats,
        default=None,
        help="α values: 1 for the width check; 1,0 for the depth check",
    )
    cc.add_argument("--width", type=int, default=64, help="width of the depth check")
    cc.add_argument("--depth", type=int, default=2, help="depth of the width check")
    cc.add_argument("--n-heads", type=int, default=2)
    cc.add_argument("--steps", type=int, default=5)
    cc.add_argument("--seeds", type=int, default=3, help="number of seeds")
    cc.add_argument("--batch-size", type=int, default=8)
    cc.add_argument("--block-size", type=int, default=64)
    cc.add_argument("--data", default=None, help="data path (default: Tiny Shakespeare)")
    cc.add_argument("--out", default="runs/coord", help="directory for the PNG grids")
    cc.add_argument("--json", default=None, help="JSON path (default: OUT/coord.json)")
    cc.add_argument(
        "--zero-init-readout",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="zero-init the readout in every row (the zero-head protocol; default: the training "
        "default, a σ_b-initialized head)",
    )
    cc.add_argument("--quiet", action="store_true")

    sw = sub.add_parser(
        "sweep",
        help="a grid of training runs (LR × WD × width × depth × seed) into a SQLite store",
        description="Run every run of a sweep spec (see configs/sweeps/) not yet in its store; "
        "rerunning skips finished runs, retries failed ones and resumes killed ones from their "
        "checkpoints.",
    )
    sw.add_argument("spec", help="sweep spec TOML (see configs/sweeps/)")
    sw.add_argument("--executor", choices=("local", "ray"), default=None, help="default: local")
    sw.add_argument("--workers", type=int, default=None, help="runs at once (0 = auto)")
    sw.add_argument(
        "--batch-runs",
        type=int,
        default=None,
        help="runs of one shape trained as one stack per worker: 0 = auto (where it measured "
        "faster), 1 = one run at a time, K = up to K (default: the spec's, else auto)",
    )
    sw.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs; train nothing")
    sw.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only the runs whose grid KEY is VALUE, e.g. --only arch=llama --only param=mup",
    )

    sw.add_argument(
        "--near-best",
        type=int,
        default=None,
        metavar="K",
        help="only the runs within K LR grid steps of their group's stored best LR (seed "
        "mean), e.g. the second seed where it decides the optimum: --near-best 1 --only seed=1",
    )

    tr = sub.add_parser(
        "transfer",
        help="sweep a proxy model, train the target with its best LR under μP (and SP)",
        description="Run the proxy runs of a sweep spec, pick the best LR of each "
        "parametrization (seed mean), train the target width/depth with it and compare.",
    )
    tr.add_argument("spec", help="sweep spec TOML whose grid holds the proxy size")
    tr.add_argument("--target-width", type=int, required=True)
    tr.add_argument("--target-depth", type=int, default=None, help="default: the proxy's")
    tr.add_argument("--proxy-width", type=int, default=None, help="when the spec has several")
    tr.add_argument("--proxy-depth", type=int, default=None, help="when the spec has several")
    tr.add_argument(
        "--sp",
        action="store_true",
        help="also SP: at SP's proxy optimum, or with --tune tuned at the target itself",
    )
    tr.add_argument(
        "--tune",
        action="store_true",
        help="tune every swept HP (grid and [search]: LR, per-role LR/init multipliers, …) on "
        "the proxy, not only the LR; report each side's tuning FLOPs and wall time",
    )
    tr.add_argument(
        "--sp-spec",
        default=None,
        help="with --tune --sp: SP's candidates are this spec's SP runs (resized to the target), "
        "e.g. an LR grid for SP while the main spec searches several HPs for μP",
    )
    tr.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="with --tune: train each side's best K candidates again with --rerank-seeds more "
        "seeds and pick the winner over all their seeds (default 0: no rerank)",
    )
    tr.add_argument("--rerank-seeds", type=int, default=None, metavar="S", help="default 2")
    tr.add_argument(
        "--refine-lr",
        type=int,
        default=0,
        metavar="K",
        help="with --tune: then train each side's winner at LR × 2^±1 … 2^±K on all its "
        "seeds and keep the best (default 0: no LR line search)",
    )
    tr.add_argument(
        "--eval-seeds",
        type=int,
        default=0,
        metavar="N",
        help="with --tune: measure both winners at the target on N fresh seeds (paired by "
        "seed; SP free of its tuning seeds' selection bias). Default 0: the spec's seeds",
    )
    tr.add_argument("--executor", choices=("local", "ray"), default=None, help="default: local")
    tr.add_argument("--workers", type=int, default=None, help="runs at once (0 = auto)")
    tr.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")

    pr = sub.add_parser(
        "probe",
        help="measure an optimizer's update-norm exponents and derive its μP rule",
        description="Train the bundled model a few steps at several widths (and depths) with "
        "the optimizer at a fixed LR, fit the width exponent of each role's update norm, and "
        "derive its μP rule (cached, so build_optimizer/coord-check/sweep can use it).",
    )
    pr.add_argument(
        "--optimizer", required=True, help="a registered name or an import path (torch.optim.RAdam)"
    )
    pr.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the optimizer's constructor, e.g. --opt momentum=0.9",
    )
    pr.add_argument("--spectral-normalize", action="store_true", help="wrap in SpectralNormalized")
    pr.add_argument("--widths", type=_ints, default=[64, 128, 256, 512])
    pr.add_argument("--depths", type=_ints, default=[2, 4, 8], help="at the base width; '2' skips")
    pr.add_argument("--seeds", type=int, default=3, help="number of seeds")
    pr.add_argument("--steps", type=int, default=5, help="measured steps")
    pr.add_argument("--skip", type=int, default=5, help="steps before them (the transient)")
    pr.add_argument(
        "--lr", type=float, default=1e-6, help="the fixed base LR (tiny: the model stays at init)"
    )
    pr.add_argument("--arch", default="gpt", help="bundled model: gpt | llama")
    pr.add_argument(
        "--model",
        default=None,
        metavar="IMPORT_PATH",
        help="instead of --arch: a factory f(width, depth, p) returning your model with roles "
        "(pkg.module:function); trained on --data's tokens with cross-entropy on its logits",
    )
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--block-size", type=int, default=32)
    pr.add_argument("--data", default=None, help="data path (default: Tiny Shakespeare)")
    pr.add_argument("--out", default="runs/probe", help="directory for probe.json and probe.png")
    pr.add_argument("--no-cache", action="store_true", help="do not cache the derived rule")
    pr.add_argument("--quiet", action="store_true")

    data = sub.add_parser("data", help="prepare token .bin files (train.bin, val.bin, meta.json)")
    data.add_argument(
        "source",
        nargs="?",
        default="shakespeare",
        help="'shakespeare' (default) or a UTF-8 text file",
    )
    data.add_argument("--out", required=True, help="output directory")

    report = sub.add_parser(
        "report",
        help="tables (val loss per LR × width/depth), loss-vs-LR plots and optimum drift",
    )
    report.add_argument("store", help="the sweep's run store (SQLite file)")
    report.add_argument(
        "--out",
        default=None,
        help="output directory (default: STORE_STEM_report/ beside the store)",
    )
    report.add_argument("--sweep", default=None, help="report only this sweep of the store")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("train", "sweep", "transfer", "coord-check", "probe"):
            from .train import keep_freed_memory

            keep_freed_memory()  # faster CPU steps; process-wide, so here and not in run
        if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # every rank would run the whole command and write the same files
            raise ConfigError(
                f"smup {args.command} runs in one process (sweeps start their own workers); "
                "launch it without torchrun — only smup train runs on several ranks"
            )
        if args.command == "train":
            return _train(args, extra)
        if args.command == "coord-check":
            return _coord_check(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "transfer":
            return _transfer(args)
        if args.command == "probe":
            return _probe(args)
        return _data(args)
    except SmupError as exc:
        print(f"smup: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smup: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config
    from .distributed import main_process
    from .train import run

    cfg = load_config(args.config, overrides)
    result = run(cfg)
    if not main_process():  # under torchrun, rank 0 reports
        return 0
    best = result["best_val_loss"]
    best_text = f"{best:.4f} at iteration {result['best_iter']}" if best is not None else "n/a"
    print(
        f"{result['status']} ({result['stop_reason']}) after {result['iters']} iterations; "
        f"best val loss {best_text}; wrote {Path(cfg.train.out_dir) / 'result.json'}"
    )
    return 0


def _probe(args: argparse.Namespace) -> int:
    import ast

    from .config import optimizer_option
    from .fileio import write_json
    from .optim import REGISTRY, get_spec
    from .probe import cache_path, full_options, probe

    spec = get_spec(args.optimizer)  # an unknown name or a bad import path: exit 2 first
    registered = args.optimizer.lower() in REGISTRY
    options = {}
    for assignment in args.opt:
        if registered:
            key, value = optimizer_option(assignment)
        else:
            key, sep, text = assignment.partition("=")
            if not sep or key not in {*spec.defaults, spec.eps_key}:
                known = ", ".join(k for k in (*spec.defaults, spec.eps_key) if k)
                raise ConfigError(f"--opt needs KEY=VALUE, KEY one of: {known}; got {assignment!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        options[key] = value
    result = probe(
        args.optimizer,
        options=options,
        widths=args.widths,
        depths=args.depths,
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        skip=args.skip,
        lr=args.lr,
        arch=args.arch,
        model=_factory(args.model) if args.model else None,
        batch_size=args.batch_size,
        block_size=args.block_size,
        data=args.data,
        spectral_normalize=args.spectral_normalize,
        progress=not args.quiet,
    )
    out = Path(args.out)
    json_path = result.save_json(out / "probe.json")
    plot = result.plot(out / "probe.png")
    print(result.table())
    print(f"wrote {json_path} and {plot}")
    if not args.no_cache and not args.spectral_normalize and not registered:
        cached = write_json(cache_path(result.optimizer, full_options(args.optimizer, options)),
                            result.to_json())  # fmt: skip
        print(f"cached the rule at {cached}: build_optimizer({args.optimizer!r}, …) uses it")
    return 0


def _factory(path: str) -> Callable:
    factory = import_object(path, "model factory")
    if not callable(factory):
        raise ConfigError(
            f"{path} is not callable: --model takes a model factory f(width, depth, p)"
        )
    return factory


def _coord_check(args: argparse.Namespace) -> int:
    from .config import model_option, optimizer_option
    from .coord import model_coord_check
    from .fileio import write_json
    from .optim import get_spec, normalize_options, optimizer_key

    spec = get_spec(args.optimizer)
    optimizer_kwargs = {}
    if spec.aux is not None:  # the LR of its AdamW part (Muon's)
        optimizer_kwargs[spec.aux.lr] = args.adam_lr or spec.aux.coord_lr
    if args.shape_factor is not None:
        if "shape_factor" not in spec.defaults:
            raise ConfigError(f"--shape-factor applies to muon, not {args.optimizer}")
        optimizer_kwargs["shape_factor"] = args.shape_factor
    if args.spectral_normalize:
        optimizer_kwargs["spectral_normalize"] = True
    for assignment in args.opt:
        key, value = optimizer_option(assignment)  # eps: the optimizer's own name for its ε
        unknown = f"--opt {key} is not an option of {args.optimizer}"
        optimizer_kwargs.update(normalize_options(spec, {key: value}, unknown=unknown))
    if spec.curvature is not None:  # Sophia: estimate h every step of a short check
        optimizer_kwargs.setdefault(spec.curvature.interval, 1)
    for name in ("width", "depth", "n_heads", "steps", "seeds", "batch_size", "block_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    lr = args.lr if args.lr is not None else spec.coord_lr
    widths = args.widths or ([] if args.depths else [64, 128, 256, 512])
    common = dict(
        arch=args.arch,
        model_options=dict(model_option(a, args.arch) for a in args.model),
        optimizer=optimizer_key(args.optimizer),
        lr=lr,
        steps=args.steps,
        seeds=tuple(range(args.seeds)),
        width=args.width,
        depth=args.depth,
        n_heads=args.n_heads,
        batch_size=args.batch_size,
        block_size=args.block_size,
        data=args.data,
        optimizer_kwargs=optimizer_kwargs,
        zero_init_readout=args.zero_init_readout,
        progress=not args.quiet,
    )
    for flag, sizes in (("--widths", widths), ("--depths", args.depths or [])):
        if sizes and len(set(sizes)) < 2:
            raise ConfigError(
                f"{flag} needs at least two different sizes to fit a slope, e.g. 64,128"
            )
    out = Path(args.out)
    reports = {}
    if widths:
        reports["width"] = model_coord_check(
            axis="width",
            sizes=widths,
            kinds=args.param,
            depth_alphas=args.depth_alpha or [1.0],
            **common,
        )
    if args.depths:
        reports["depth"] = model_coord_check(
            axis="depth",
            sizes=args.depths,
            kinds=["mup"],
            depth_alphas=args.depth_alpha or [1.0, 0.0],
            **common,
        )
    for axis, report in reports.items():
        png = report.plot(out / f"coord_{axis}.png")
        print(f"{axis}: {png}")
        print(f"  slope of Δ RMS vs {axis} at step {report.steps} ({args.optimizer}, lr {lr:g}):")
        width = max(len(g) for g in report.groups)
        for label, slopes in report.slopes().items():
            cells = "  ".join(f"{g:>{width}} {s:+.2f}" for g, s in slopes.items())
            print(f"  {label:>10}: {cells}")
    json_path = Path(args.json) if args.json else out / "coord.json"
    write_json(json_path, {axis: r.to_json() for axis, r in reports.items()})
    print(f"wrote {json_path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .store import RunStore
    from .sweep import dry_run_lines, load_spec, near_best, restrict, run_sweep

    spec = load_spec(args.spec)
    if args.near_best is not None:
        rows = {}
        if spec.store.exists():
            with RunStore(spec.store, create=False) as store:
                rows = {row["id"]: row for row in store.rows()}
        every = len(spec.runs)
        spec = near_best(spec, args.near_best, rows)
        print(f"--near-best {args.near_best}: {len(spec.runs)} of {every} runs (groups not yet "
              "finished at every LR keep all)")  # fmt: skip
    spec = restrict(spec, args.only)
    if args.dry_run:
        print("\n".join(dry_run_lines(spec)))
        return 0
    summary = run_sweep(spec, executor=args.executor, workers=args.workers, address=args.address,
                        batch_runs=args.batch_runs)  # fmt: skip
    print(summary.line())
    return 1 if summary.lost else 0


def _transfer(args: argparse.Namespace) -> int:
    from .transfer import run_transfer, run_tuned_transfer

    if args.sp_spec and not args.tune:
        raise ConfigError("--sp-spec goes with --tune --sp")
    tuning = {"rerank": args.rerank, "rerank_seeds": args.rerank_seeds,
              "refine_lr": args.refine_lr, "eval_seeds": args.eval_seeds}  # fmt: skip
    tuning = {k: v for k, v in tuning.items() if v is not None}
    if (args.rerank_seeds is not None or any(tuning.values())) and not args.tune:
        raise ConfigError("--rerank, --rerank-seeds, --refine-lr and --eval-seeds go with --tune")
    extra = {"sp_spec": args.sp_spec, **tuning} if args.tune else {}
    result = (run_tuned_transfer if args.tune else run_transfer)(
        args.spec,
        args.target_width,
        args.target_depth,
        proxy_width=args.proxy_width,
        proxy_depth=args.proxy_depth,
        sp=args.sp,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        **extra,
    )
    print("\n".join([*result.lines(), f"wrote {result.path}"]))
    return 0


def _data(args: argparse.Namespace) -> int:
    from .data import load_dataset, prepare_bin

    dataset = load_dataset(None if args.source == "shakespeare" else args.source)
    out = prepare_bin(dataset, args.out)
    print(
        f"wrote {out}/train.bin ({len(dataset.train)} tokens), "
        f"val.bin ({len(dataset.val)} tokens), "
        f"meta.json (vocab {dataset.vocab_size})"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import comparison_table, plain_table, report_store

    report, paths = report_store(args.store, args.out, args.sweep)
    print(plain_table(comparison_table(report.comparison)))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
