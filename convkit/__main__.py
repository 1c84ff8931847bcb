"""The command line: ``python -m convkit <command>`` (also installed as ``convkit``).

    convkit chapter13 [--experiments 2,7] [--backend convkit|torch|both] [--seed 0[,1,2]]
                      [--dataset mnist|fashion_mnist] [--out DIR] [--quick] [--resume]
    convkit data [--dataset mnist|mnist_sample|fashion_mnist] [--data-folder DIR]
    convkit report [--out DIR]
    torchrun --nproc-per-node 2 -m convkit chapter13 ...   (data-parallel: convkit.train.distributed)

Whatever goes wrong, the command prints one line naming the problem (and the fix where there is
one) and exits with a non-zero status, never a traceback (CONVKIT_TRACEBACK=1 shows one for an
unexpected error); results already written are never lost.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_OUT = "chapter13-out"
CHAPTER13_EXPERIMENTS = range(1, 9)
MAX_SEED = 2**63 - 1  # torch.manual_seed's and the loaders' generators' range


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _experiments(text: str) -> list[int]:
    values = _int_list(text)
    unknown = [v for v in values if v not in CHAPTER13_EXPERIMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {', '.join(map(str, unknown))}: chapter 13 has experiments "
            f"{CHAPTER13_EXPERIMENTS.start}-{CHAPTER13_EXPERIMENTS.stop - 1}"
        )
    return values


def _seeds(text: str) -> list[int]:
    values = _int_list(text)
    bad = [v for v in values if not 0 <= v <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"seed {bad[0]} is out of range: seeds go from 0 to 2**63 - 1")
    return values


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 thread, got {value}")
    return value


def _backends(text: str) -> list[str]:
    if text == "both":
        return ["convkit", "torch"]
    values = [part.strip() for part in text.split(",") if part.strip()]
    for value in values:
        if value not in ("convkit", "torch"):
            raise argparse.ArgumentTypeError(f"unknown backend {value!r}: use convkit, torch or both")
    return values


class _Parser(argparse.ArgumentParser):
    """An argument error is one line (and the exit status 2), with where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convkit", description="convkit: our own conv2d and BatchNorm+ReLU kernels for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    chapter.add_argument("--experiments", type=_experiments, default=list(CHAPTER13_EXPERIMENTS),
                         help="comma-separated experiment numbers (default: 1-8)")
    chapter.add_argument("--backend", type=_backends, default=["convkit"],
                         help="convkit (our kernels, default), torch (torch's layers) or both")
    chapter.add_argument("--seed", type=_seeds, default=[0],
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
    chapter.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (at least 1)")
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
    # The trainer is imported once the arguments are parsed: --help and a bad argument answer
    # without loading it.
    from convkit.train.checkpoints import CheckpointError
    from convkit.train.data import DataUnavailableError

    expected_errors = (DataUnavailableError, CheckpointError, ValueError, OSError)
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        print("\nconvkit: interrupted. Finished experiments are in results.json; rerun the same "
              "command with --resume to continue from the last completed epoch.", file=sys.stderr)
        return 130
    except expected_errors as error:
        print(f"convkit: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the command line never shows a traceback
        if os.environ.get("CONVKIT_TRACEBACK") == "1":
            raise
        print(f"convkit: unexpected error ({type(error).__name__}: {_one_line(error)}); results "
              "written so far are kept. Rerun with CONVKIT_TRACEBACK=1 to see where it happened.",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """The error's message, its lines joined (a multi-line message names every data source)."""
    text = str(error).strip() or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _run_command(args: argparse.Namespace) -> int:
    from convkit.train import data

    if args.command == "data":
        dataset = data.load_dataset(args.dataset, args.data_folder, verbose=True)
        print(data.describe(dataset))
        print(f"cache: {data.cache_dir()}")
        return 0
    if args.command == "report":
        from convkit.experiments import report, results

        results_path = args.out / "results.json"
        if not results_path.is_file():
            print(f"convkit: no results.json in {args.out} (run `convkit chapter13 --out "
                  f"{args.out}` first)", file=sys.stderr)
            return 2
        loaded = results.load_results(results_path)
        results.write_tables(args.out, loaded)
        print(report.write_report(args.out, loaded))
        return 0
    return _chapter13(args)


def _chapter13(args: argparse.Namespace) -> int:
    import torch

    from convkit.experiments import runner

    from convkit.train import distributed

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Under torchrun (WORLD_SIZE > 1): join its process group; the Learner trains data-parallel.
    distributed.init_from_environment("cpu")
    config = runner.RunConfig(
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
    main_process = distributed.is_main()
    try:
        runner.run(config)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if main_process:
        print(f"\nreport: {args.out / 'report.md'}\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
