"""The ``gradcomp`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _density(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradcomp", description=__doc__ and
                                     "Deep Gradient Compression and friends for PyTorch data parallelism.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list the registered compressors")

    demo = sub.add_parser("demo", help="dense vs DGC on scikit-learn's digits with simulated workers (~1 min)",
                          description="Train an MLP on scikit-learn's bundled digits with N simulated workers, "
                                      "once dense and once with DGC, and print accuracy and bytes sent.")
    demo.add_argument("--epochs", type=_positive_int, default=20, help="training epochs (default 20)")
    demo.add_argument("--workers", type=_positive_int, default=4, help="simulated workers (default 4)")
    demo.add_argument("--density", type=_density, default=0.001, help="DGC's final density (default 0.001)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    comp = bench_sub.add_parser("compress", help="DGC's compression step vs torch.topk vs one SGD step",
                                description="Time DGC's whole compression step and exact torch.topk selection on "
                                            "one gradient tensor, each as a ratio to one "
                                            "torch.optim.SGD(momentum=0.9) step measured in the same run.")
    comp.add_argument("--numel", type=_positive_int, default=25_557_032,
                      help="gradient size (default: ResNet-50's 25,557,032)")
    comp.add_argument("--density", type=_density, default=0.001, help="density (default 0.001)")
    comp.add_argument("--repeats", type=_positive_int, default=15, help="timed repeats (default 15)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        from . import available

        print("\n".join(available()))
    elif args.command == "demo":
        from .demo import run

        print(run(epochs=args.epochs, workers=args.workers, density=args.density, progress=not args.no_progress))
    elif args.command == "bench" and args.bench == "compress":
        from .bench.compress import main as bench_compress

        print(bench_compress(numel=args.numel, density=args.density, repeats=args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
