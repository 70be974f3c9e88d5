"""The ``gradcomp`` command."""

from __future__ import annotations

import argparse
import ast
import errno
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _density(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``gradcomp`` command: ``list``, ``train``, ``plot``, ``bench`` and ``reproduce``.

    Returns:
        The parser; its ``parse_args`` gives the chosen subcommand as ``command``.
    """
    parser = argparse.ArgumentParser(prog="gradcomp", description=__doc__ and
                                     "Deep Gradient Compression and friends for PyTorch data parallelism.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list the registered compressors")
    _add_train(sub)

    plot = sub.add_parser("plot", help="overlay the curves of several runs in one PNG and print a comparison",
                          description="Overlay training loss, test accuracy/perplexity and cumulative MB sent of "
                                      "several run directories in one PNG, and print a markdown comparison table.")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by gradcomp train")
    plot.add_argument("-o", "--output", default="comparison.png", help="PNG to write (default comparison.png)")

    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_benches(bench_sub)
    _add_reproduce(sub)
    return parser


def _add_study_options(p: argparse.ArgumentParser) -> None:
    """The options every study takes, ``gradcomp reproduce`` and ``gradcomp bench`` alike."""
    p.add_argument("--full", action="store_true", help="the full variant (default: the quick one)")
    p.add_argument("--out", default="results", metavar="DIR", help="folder for the report and plots (default results)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=_positive_int, help="torch threads for the study (default: the study's, "
                                                         "usually 1: results do not depend on the core count)")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="independent runs of a study trained at once, each in its own process (default 1; "
                        "the results do not depend on it)")
    p.add_argument("--runs", metavar="DIR", help="keep the training runs in DIR/TABLE/ and continue the unfinished "
                                                 "ones found there: run the same command again to resume a study "
                                                 "that stopped; a finished run is read back from its summary, so "
                                                 "results/runs keeps the finished rows of the long studies without "
                                                 "their checkpoints (default: a temporary folder)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_benches(bench_sub: argparse._SubParsersAction) -> None:
    from gradcomp_studies.reproduce import studies

    importlib.import_module("gradcomp_studies.bench")  # importing it registers the benchmarks

    for s in studies("bench"):
        p = bench_sub.add_parser(
            s.name, help=s.summary,
            description=f"{s.summary}. Writes DIR/bench-{s.name}.md (--full) or DIR/bench-{s.name}-quick.md (the "
                        "quick variant CI runs) with the command, machine and date, and the numbers as JSON. "
                        "Exits 1 when a check fails.")
        _add_study_options(p)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from gradcomp_studies.reproduce import studies

    listing = "\n".join(f"  {s.name:<10} {s.summary}" for s in studies()) or "  (none registered)"
    p = sub.add_parser(
        "reproduce", help="run a study of the papers end to end and print it beside the published figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a study end to end with fixed seeds, print our table beside the published figures and "
                    "write a\nmarkdown report (command, seed, machine, date, wall time) with its PNG plots to "
                    "DIR/TABLE.md\n(--full) or DIR/TABLE-quick.md (the quick variant CI runs, with assertions). "
                    "Exits 1 when a check\nfails, 2 on an unknown table.",
        epilog=f"tables:\n{listing}")
    p.add_argument("table", nargs="?", metavar="TABLE", help="the table to reproduce (listed below)")
    p.add_argument("--list", action="store_true", help="list the tables and exit")
    _add_study_options(p)


def _reproduce(args: argparse.Namespace) -> int:
    from gradcomp_studies.reproduce import studies

    if args.list or args.table is None:
        if args.table is None and not args.list:
            print("gradcomp reproduce: error: name a TABLE (or --list)", file=sys.stderr)
        for s in studies():
            print(f"{s.name:<10} {s.summary}")
        return 0 if args.list else 2
    return _run_study(args, args.table, "reproduce")


def _run_study(args: argparse.Namespace, name: str, kind: str) -> int:
    from gradcomp_studies.reproduce import StudySkipped, UnknownStudyError, run_study

    from .launch import WorkerError

    try:
        outcome = run_study(name, full=args.full, out_dir=args.out, seed=args.seed, threads=args.threads,
                            jobs=args.jobs, progress=not args.no_progress, kind=kind, runs_dir=args.runs)
    except (UnknownStudyError, ValueError, OSError) as error:  # an unknown study, a bad setting, a file
        print(f"gradcomp {kind}: error: {error}", file=sys.stderr)
        return 2
    except StudySkipped as error:
        print(f"gradcomp {kind} {name}: skipped: {error}", file=sys.stderr)
        return 0
    except WorkerError as error:  # the whole report is in the run's worker-errors.log
        print(f"gradcomp {kind} {name}: error: {error.summary}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = (f"run the same command again to continue from the runs kept in {args.runs}" if args.runs else
                 "with --runs DIR a study keeps its runs and continues them when run again")
        print(f"gradcomp {kind} {name}: interrupted; {again}", file=sys.stderr)
        return 130
    return 0 if outcome.passed else 1


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.replace("-", "_"), parsed


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a model across N workers with a chosen method and report accuracy and bytes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model data-parallel across N workers with a gradient compression method.\n\n"
                    "Starts N local worker processes itself, or joins a torchrun launch when RANK and\n"
                    "WORLD_SIZE are set; on GPUs (--device) each rank trains on cuda:LOCAL_RANK with NCCL:\n"
                    "  torchrun --standalone --nproc-per-node 4 -m gradcomp train --dataset mnist\n"
                    "  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
                    "           --rdzv-id job1 -m gradcomp train --dataset mnist      (on every node)\n"
                    "--simulate runs the same job with N simulated workers in one process.\n\n"
                    "Writes a run directory: config.json, metrics.jsonl, checkpoint.pt (the one before it kept as\n"
                    "checkpoint.prev.pt), summary.json, curves.png.\n\n"
                    "Surviving a failure: --max-restarts K restarts the workers from the last checkpoint when one\n"
                    "fails; under torchrun, use torchrun's own --max-restarts K and a fixed --run-dir (the default\n"
                    "run directory there is named after torchrun's run id): a restarted rank resumes from the\n"
                    "checkpoint it finds. --checkpoint-every N bounds what a failure loses to N steps.")
    # one help section per section of TrainConfig (gradcomp.train.config), then the job's own flags
    for add_flags in (_data_flags, _model_flags, _exchange_flags, _averaging_flags,
                      _optim_flags, _schedule_flags, _launch_flags, _output_flags, _job_flags):
        add_flags(p)
    return p


def _data_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.data``."""
    from .train.data import DATASETS, PARTITIONS
    g = parser.add_argument_group("data", "the dataset, its split among the workers, the batches (TrainConfig.data)")
    g.add_argument("--dataset", choices=DATASETS, default="digits", help="dataset (default digits: offline anywhere)")
    g.add_argument("--data-dir", help="folder holding mnist/, fashion-mnist/, ptb/, tinyshakespeare/ "
                                      "(default: $GRADCOMP_DATA, then ../shared/data beside the checkout)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="batch size per worker (default 16)")
    g.add_argument("--bptt", type=_positive_int, default=35, help="LM sequence length (default 35)")
    g.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="how the training data is split among workers: iid (default), or skewed: each worker only "
                        "a few classes (images) or speakers (shakespeare)")
    g.add_argument("--limit-train", type=_positive_int, help="use only the first N training samples/tokens")
    g.add_argument("--limit-test", type=_positive_int, help="evaluate on the first N test samples/tokens only")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.model``."""
    from .train.models import MODELS
    g = parser.add_argument_group("model", "the model (TrainConfig.model)")
    g.add_argument("--model", choices=sorted(MODELS), help="model (default: mlp for digits, cnn for (fashion-)mnist, "
                                                           "lstm for ptb/shakespeare)")
    g.add_argument("--model-option", dest="model_options", action="append", type=_option, default=[],
                   metavar="KEY=VALUE", help="an option of the model, e.g. --model-option hidden=128 (lstm); "
                                             "repeatable")


def _exchange_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.exchange``."""
    from .guard import NONFINITE
    g = parser.add_argument_group("method", "how the workers exchange their gradients (TrainConfig.exchange)")
    g.add_argument("--compressor", "--method", dest="method", default="dgc",
                   help="method: 'dgc' (the whole of DGC) or any compressor of 'gradcomp list'; 'none' is the dense "
                        "baseline (default dgc)")
    g.add_argument("--density", type=_density, help="kept fraction for dgc/topk/randomk (dgc default 0.001)")
    g.add_argument("--warmup-epochs", type=float, help="DGC's sparsity warm-up length in epochs (default 4)")
    g.add_argument("--no-momentum-masking", action="store_true", help="DGC without momentum factor masking")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (DGC's momentum correction)")
    g.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="any option of the method, e.g. -o rank=2 (powersgd), -o tau=0.01 (threshold), "
                        "-o levels=4 (qsgd), -o sample_ratio=0.01 (dgc); repeatable")
    g.add_argument("--nonfinite", choices=NONFINITE, default="skip",
                   help="a NaN or Inf gradient on any rank: skip the step on every rank, memory and weights "
                        "unchanged, and log it (default), or raise")


def _averaging_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.averaging``."""
    g = parser.add_argument_group("DGA and FedAvg", "when the average is applied (TrainConfig.averaging)")
    g.add_argument("--dga-delay", type=_non_negative_int, metavar="D",
                   help="delayed gradient averaging: apply each step's average D steps later, corrected by the "
                        "newer local gradient (Zhu et al. 2021); 0 is synchronous SGD")
    g.add_argument("--no-dga-correction", action="store_true",
                   help="with --dga-delay: apply the stale average alone (the paper's 'w/o correction')")
    g.add_argument("--fedavg-period", type=_positive_int, metavar="K",
                   help="FedAvg / local SGD: each worker steps on its own gradients, the weights are averaged every "
                        "K steps (with --compressor none); with --dga-delay D each round's average is applied D steps "
                        "later, the worker's own delta swapped for it (DGA with local steps)")


def _optim_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.optim``."""
    from .train.config import OPTIMIZERS
    g = parser.add_argument_group("optimizer", "the optimizer each worker steps with (TrainConfig.optim)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd (default; momentum SGD, DGC applying the momentum itself) or adamw (its own moments: "
                        "momentum must be 0, and DGC runs with momentum 0, error-feedback top-k)")
    g.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=None,
                   help="momentum (default 0.9 with sgd, 0 with adamw, which refuses any other; DGC applies it "
                        "itself)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay, applied locally, never sent (default 0); with sgd and dgc, which owns "
                        "momentum, scaled by 1/(1 - momentum) to decay as much as momentum SGD does; with adamw "
                        "AdamW's decoupled decay")
    g.add_argument("--clip-norm", type=float, help="gradient clipping: other methods clip the averaged gradient "
                                                   "to this norm; DGC clips each worker's gradient before compressing, "
                                                   "to clip_norm*sqrt(N) (the paper's N^-1/2 share of the summed "
                                                   "gradient)")


def _schedule_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.schedule``."""
    g = parser.add_argument_group("schedule",
                                  "how long training runs, the learning rate's course (TrainConfig.schedule)")
    g.add_argument("--epochs", type=_positive_int, default=20, help="epochs (default 20)")
    g.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop after N steps in total, with a checkpoint there; continue later with --resume")
    g.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--lr-milestones", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="multiply the learning rate by --lr-decay at the start of each of these epochs")
    g.add_argument("--lr-decay", type=float, default=0.1, help="step-decay factor for --lr-milestones (default 0.1)")


def _launch_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.launch``."""
    from .launch import DEVICES
    g = parser.add_argument_group("workers", "how many, where they run, the seed (TrainConfig.launch)")
    g.add_argument("--workers", type=_positive_int, default=4, help="number of workers N (default 4)")
    g.add_argument("--simulate", action="store_true", help="N simulated workers in one process")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="where each rank trains: cuda puts local rank r on cuda:r (under torchrun cuda:LOCAL_RANK) "
                        "with NCCL and needs a GPU per local rank; cpu uses gloo; auto (default) is cuda when CUDA "
                        "is available with a GPU for every local rank, else cpu. --simulate runs every worker on "
                        "one device. May change on --resume")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--emulate-latency-ms", type=float, default=0.0, metavar="L",
                   help="experiments only: each collective completes no earlier than L ms after it is issued "
                        "(this kernel has no netem; bandwidth stays real). Real processes only")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``TrainConfig.output``."""
    g = parser.add_argument_group("output", "what the run writes and shows (TrainConfig.output)")
    g.add_argument("--run-dir", help="run directory (default runs/DATASET-METHOD-Nw-TIMESTAMP)")
    g.add_argument("--label", help="label of the run in plots and tables")
    g.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="also write the checkpoint every N steps, not only at epoch ends: a failure loses at most N "
                        "steps (default: epoch ends only)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--link-gbps", type=float, default=1.0, help="link speed for the step-time estimate (default 1)")


def _job_flags(parser: argparse.ArgumentParser) -> None:
    """The job's own flags: resuming, restarts, the dense baseline (not part of the run's config)."""
    g = parser.add_argument_group("the job", "resuming, restarts, the dense baseline (not part of the run's config)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its checkpoint, mid-epoch too, exactly as if it had not stopped. Its "
                        "config.json is used; only " + ", ".join(RESUME_FLAGS) + " may be given with it, each "
                        "change said and recorded in config.json (any other flag is refused). --max-steps stops "
                        "one invocation: without it the resumed run trains to its end. A run directory with no "
                        "checkpoint yet starts again from step 0")
    g.add_argument("--max-restarts", type=_non_negative_int, default=0, metavar="K",
                   help="when a worker process fails or dies, restart all workers from the last checkpoint, up to K "
                        "times (default 0). Under torchrun use torchrun's --max-restarts instead")
    g.add_argument("--timeout", type=_positive_float, default=3600.0, metavar="SECONDS",
                   help="how long a rank waits for a peer (to join, inside a collective) before the job fails "
                        "instead of hanging; with --max-restarts it is then restarted (default 3600)")
    g.add_argument("--allow-oversubscribe", action="store_true",
                   help="start more worker processes than 4 per CPU core (at least 8 are always allowed); "
                        "without it such a --workers is refused before anything starts (--simulate runs any "
                        "number in one process)")
    g.add_argument("--baseline", action="store_true",
                   help="then train the same run with the dense fp32 all-reduce (--compressor none, synchronous; "
                        "into RUN_DIR-dense) and print both side by side: accuracy, MB per worker, time per step "
                        "and the step estimated on --link-gbps; their curves go to RUN_DIR/vs-dense.png")


#: the flags ``--resume`` takes: what may change mid-run, and what belongs to one invocation only
RESUME_FLAGS = ("--epochs", "--max-steps", "--checkpoint-every", "--device", "--no-progress", "--timeout",
                "--max-restarts", "--allow-oversubscribe", "-v")


def _explicit_train_flags(argv: list[str]) -> dict[str, str]:
    """``gradcomp train``'s options given on the command line ``argv`` (not left at their defaults, even
    where given with the default's value): destination -> the flag's name."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    train = _add_train(parser.add_subparsers(dest="command"))
    names = {}
    for action in train._actions:
        action.default = argparse.SUPPRESS
        names[action.dest] = max(action.option_strings, key=len, default=action.dest)
    given = vars(parser.parse_args(argv))
    return {dest: names.get(dest, "--verbose") for dest in given if dest != "command"}


def _resume_config(args: argparse.Namespace, argv: list[str]):
    """The config of ``--resume RUN_DIR``: the run's own, with the changes the flags given explicitly make;
    a flag that would change the run itself is a ``ValueError`` naming it."""
    from .train.loop import resume_config

    given = _explicit_train_flags(argv)
    refused = sorted(flag for flag in given.values() if flag not in (*RESUME_FLAGS, "--resume", "--verbose"))
    if refused:
        raise ValueError(f"--resume {args.resume} continues the run with its own settings: {', '.join(refused)} "
                         f"would change them (only {', '.join(RESUME_FLAGS)} may be given with --resume)")
    changes: dict[str, Any] = {dest: getattr(args, dest)
                               for dest in ("epochs", "max_steps", "checkpoint_every", "device") if dest in given}
    if "no_progress" in given:
        changes["progress"] = False
    return resume_config(args.resume, **changes)


def _train_with_baseline(config: Any, **launch: Any) -> None:
    """``gradcomp train --baseline``: the run, then the same run with the dense all-reduce, then both side by
    side (a table, and their curves in one PNG)."""
    from .train.config import Averaging
    from .train.loop import default_run_dir, run
    from .train.report import compare_table, plot_runs

    if os.environ.get("RANK") is not None:
        raise ValueError("--baseline trains two runs one after the other in one launch: run it without torchrun")
    if config.exchange.method == "none" and config.averaging.dga_delay is None \
            and config.averaging.fedavg_period is None:
        raise ValueError("--baseline compares a method with dense training, and this run is dense already "
                         "(--compressor none)")
    run_dir = config.output.run_dir or default_run_dir(config)
    config = config.replace(output={"run_dir": run_dir})
    dense = config.replace(exchange={"method": "none", "options": {}}, averaging=Averaging(),
                           output={"run_dir": f"{run_dir}-dense", "label": "dense baseline"})
    for cfg in (config, dense):
        run(cfg, **launch)
    print()
    both = [run_dir, dense.output.run_dir]
    print(compare_table(both))
    print(f"curves of both: {plot_runs(both, Path(run_dir) / 'vs-dense.png')}")


def _train_config(args: argparse.Namespace):
    from .train.config import Averaging, Data, Exchange, Launch, Model, Optim, Output, Schedule, TrainConfig

    options = dict(args.options)
    if args.density is not None:
        options["density"] = args.density
    if args.method == "dgc":
        if args.warmup_epochs is not None:
            options["warmup_epochs"] = args.warmup_epochs
        if args.no_momentum_masking:
            options["momentum_masking"] = False
        if args.nesterov:
            options["nesterov"] = True
    elif args.warmup_epochs is not None or args.no_momentum_masking or args.nesterov:
        raise ValueError("--warmup-epochs, --no-momentum-masking and --nesterov are DGC options (--compressor dgc)")
    momentum = args.momentum if args.momentum is not None else 0.9 if args.optimizer == "sgd" else 0.0
    return TrainConfig(
        data=Data(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, bptt=args.bptt,
                  partition=args.partition, limit_train=args.limit_train, limit_test=args.limit_test),
        model=Model(name=args.model, options=dict(args.model_options)),
        exchange=Exchange(method=args.method, options=options, nonfinite=args.nonfinite),
        averaging=Averaging(dga_delay=args.dga_delay, dga_correction=not args.no_dga_correction,
                            fedavg_period=args.fedavg_period),
        optim=Optim(name=args.optimizer, lr=args.lr, momentum=momentum, weight_decay=args.weight_decay,
                    clip_norm=args.clip_norm),
        schedule=Schedule(epochs=args.epochs, max_steps=args.max_steps, lr_warmup_epochs=args.lr_warmup_epochs,
                          lr_milestones=args.lr_milestones, lr_decay=args.lr_decay),
        launch=Launch(workers=args.workers, simulate=args.simulate, device=args.device, seed=args.seed,
                      emulate_latency_ms=args.emulate_latency_ms),
        output=Output(run_dir=args.run_dir, label=args.label, checkpoint_every=args.checkpoint_every,
                      progress=not args.no_progress, link_gbps=args.link_gbps))


#: the packages of the ``train`` extra (pyproject.toml), by import name: the package each is installed as
TRAIN_EXTRA = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "greenlet": "greenlet"}


def _missing_extra() -> list[str]:
    """The packages of :data:`TRAIN_EXTRA` that are not installed, by the names pip installs them as (found, not
    imported: scikit-learn alone takes most of a second)."""
    missing = []
    for module, package in TRAIN_EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # in sys.modules as None: made unimportable
            found = False
        if not found:
            missing.append(package)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Run the ``gradcomp`` command; errors are reported in one line on stderr, not raised.

    Args:
        argv: the arguments after the program's name (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 done, 1 a worker failed or the disk is full, 2 a bad setting or file, 130 Ctrl-C (a
        training run prints the command that resumes it).
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a run (building the parser, plotting): nothing to continue
        print("gradcomp: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    missing = _missing_extra() if args.command != "list" else []
    if missing:
        print(f"gradcomp {args.command}: error: needs the train extra, and {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'gradcomp[train]' "
              "(or pip install -e '.[train]' in a checkout)", file=sys.stderr)
        return 2
    if args.command == "train":
        from .launch import WorkerError
        from .train.loop import TrainingInterrupted, run

        try:
            config = _train_config(args) if args.resume is None else _resume_config(args, argv)
            launch = dict(timeout_s=args.timeout, max_restarts=args.max_restarts,
                          oversubscribe=args.allow_oversubscribe)
            if args.baseline:
                _train_with_baseline(config, **launch)  # --resume with it was refused above
            else:
                run(config, resume=args.resume, **launch)
        except OSError as error:  # a full device (named by the run directory's writes): not a bad setting
            print(f"gradcomp train: error: {error}", file=sys.stderr)
            return 1 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 2
        except ValueError as error:  # a bad setting, a missing, damaged or unwritable file
            print(f"gradcomp train: error: {error}", file=sys.stderr)
            return 2
        except WorkerError as error:  # the whole report is in the run directory's worker-errors.log
            print(f"gradcomp train: error: {error.summary}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as stop:  # Ctrl-C: the last checkpoint is whole; say how to continue
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has it: rank 0 says it
                line = stop.describe() if isinstance(stop, TrainingInterrupted) else "interrupted"
                print(f"gradcomp train: {line}", file=sys.stderr)
            return 130
    elif args.command == "plot":
        from .train.report import compare_table, plot_runs

        try:
            out = plot_runs(args.run_dirs, args.output)
        except (FileNotFoundError, ValueError) as error:
            print(f"gradcomp plot: error: {error}", file=sys.stderr)
            return 2
        print(compare_table(args.run_dirs))
        print(f"wrote {out}")
    elif args.command == "list":
        from . import available

        print("\n".join(available()))
    elif args.command == "reproduce":
        return _reproduce(args)
    elif args.command == "bench":
        return _run_study(args, args.bench, "bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
