"""The command line: ``python -m convkit <command>`` (also installed as ``convkit``).

    convkit chapter13 [--experiments 2,7] [--backend convkit|torch|both] [--seed 0[,1,2]]
                      [--dataset mnist|fashion_mnist] [--out DIR] [--quick] [--resume]
    convkit data [--dataset mnist|mnist_sample|fashion_mnist] [--data-folder DIR]
    convkit report [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_OUT = "chapter13-out"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _backends(text: str) -> list[str]:
    if text == "both":
        return ["convkit", "torch"]
    values = [part.strip() for part in text.split(",") if part.strip()]
    for value in values:
        if value not in ("convkit", "torch"):
            raise argparse.ArgumentTypeError(f"unknown backend {value!r}: use convkit, torch or both")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convkit", description="convkit: our own conv2d and BatchNorm+ReLU kernels for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    chapter = commands.add_parser(
        "chapter13",
        help="reproduce chapter 13 of the fastai book (experiments 1-8) with convkit's kernels",
        description=(
            "Run the experiments of chapter 13 of the fastai book and write epoch tables, "
            "figures (PNG), results.json and report.md (published numbers beside ours) to --out. "
            "Runs into the same --out accumulate, so a convkit run and a torch run fill both "
            "columns of one report."
        ),
    )
    chapter.add_argument("--experiments", type=_int_list, default=[1, 2, 3, 4, 5, 6, 7, 8],
                         help="comma-separated experiment numbers (default: 1-8)")
    chapter.add_argument("--backend", type=_backends, default=["convkit"],
                         help="convkit (our kernels, default), torch (torch's layers) or both")
    chapter.add_argument("--seed", type=_int_list, default=[0],
                         help="seed, or comma-separated seeds to repeat every experiment (default 0)")
    chapter.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="mnist")
    chapter.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                         help=f"output folder (default ./{DEFAULT_OUT})")
    chapter.add_argument("--quick", action="store_true",
                         help="a few hundred images and batches of at most 64: a smoke test")
    chapter.add_argument("--resume", action="store_true",
                         help="skip experiments already in --out/results.json and continue an "
                              "interrupted one from its last completed epoch")
    chapter.add_argument("--data-folder", type=Path, default=None,
                         help="a local copy of the data set (IDX files or fastai's mnist_png layout)")
    chapter.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    chapter.add_argument("--no-progress", action="store_true", help="no progress bars")

    data = commands.add_parser("data", help="fetch, verify and cache a data set, then describe it")
    data.add_argument("--dataset", choices=["mnist", "mnist_sample", "fashion_mnist", "fashion_mnist_sample"],
                      default="mnist")
    data.add_argument("--data-folder", type=Path, default=None)

    report = commands.add_parser("report", help="rewrite report.md and the tables.txt files from results.json")
    report.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m convkit`` and the ``convkit`` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    from convkit import data as data_lib

    try:
        if args.command == "data":
            dataset = data_lib.load_dataset(args.dataset, args.data_folder, verbose=True)
            print(data_lib.describe(dataset))
            print(f"cache: {data_lib.cache_dir()}")
            return 0
        if args.command == "report":
            from convkit.experiments import chapter13

            if not (args.out / "results.json").is_file():
                print(f"convkit: no results.json in {args.out}", file=sys.stderr)
                return 2
            results = json.loads((args.out / "results.json").read_text())
            chapter13.write_tables(args.out, results)
            print(chapter13.write_report(args.out, results))
            return 0
        return _chapter13(args)
    except data_lib.DataUnavailableError as error:
        print(f"convkit: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nconvkit: interrupted. Finished experiments are in results.json; rerun the same "
              "command with --resume to continue from the last completed epoch.", file=sys.stderr)
        return 130


def _chapter13(args: argparse.Namespace) -> int:
    import torch

    from convkit.experiments import chapter13

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = chapter13.RunConfig(
        experiments=args.experiments,
        backends=args.backend,
        seeds=args.seed,
        dataset=args.dataset,
        out=args.out,
        quick=args.quick,
        resume=args.resume,
        data_folder=args.data_folder,
        progress=False if args.no_progress else None,
        log=lambda line: print(line, flush=True),
    )
    chapter13.run(config)
    print(f"\nreport: {args.out / 'report.md'}\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
