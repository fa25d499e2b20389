"""``python -m xmoe demo|info``.

``demo`` launches its own ranks (mpirun from the mpich wheel on the CPU simulator,
torchrun on the GPU), runs layout -> dispatch -> a toy expert -> combine on each
(:func:`xmoe.demo.run_rank`), checks the result against the NumPy reference and prints
a table; exit status 0 when it matches, 2 for bad arguments (rejected before any rank starts).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from typing import Callable, Sequence

from xmoe import runtime

DEMO_CHILD_ENV = "XMOE_DEMO_CHILD"
SIMULATOR = ("the CPU simulator (Numba's CUDA simulator runs every GPU thread as a Python thread: slow by design, "
             "expect tens of seconds; its times say nothing about a GPU)")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (argparse names the argument in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the argument types cannot check alone; ``parser.error`` (exit status 2) on the first problem."""
    if args.experts % args.ranks:
        parser.error(f"--experts {args.experts} is not divisible by --ranks {args.ranks} "
                     "(each rank holds the same number of experts)")
    if args.topk > args.experts:
        parser.error(f"--topk {args.topk} is more than --experts {args.experts} (a token's experts are distinct)")


def demo(args: argparse.Namespace) -> int:
    """In a launched rank: run the demo. Otherwise: launch ``args.ranks`` ranks running it."""
    if runtime.launched() or os.environ.get(DEMO_CHILD_ENV):
        from xmoe.demo import run_rank

        return 0 if run_rank(args.tokens, args.hidden, args.experts, args.topk, args.seed) else 1
    backend = runtime.default_backend()
    try:
        command = runtime.launcher_command(args.ranks, backend)
    except RuntimeError as exc:
        print(f"xmoe demo: {exc}", file=sys.stderr)
        return 1
    if backend == "cuda" and importlib.util.find_spec("torch") is None:
        print("xmoe demo: on the GPU the ranks run under torchrun with PyTorch tensors: pip install torch "
              "(or XMOE_BACKEND=sim for the CPU simulator)", file=sys.stderr)
        return 1
    where = SIMULATOR if backend == "sim" else f"the GPU ({runtime.gpu_count()} visible)"
    print(f"xmoe demo: starting {args.ranks} ranks on {where}", flush=True)
    child = [sys.executable, "-m", "xmoe", "demo", "--ranks", str(args.ranks), "--tokens", str(args.tokens),
             "--hidden", str(args.hidden), "--experts", str(args.experts), "--topk", str(args.topk),
             "--seed", str(args.seed)]
    env = dict(os.environ, **{DEMO_CHILD_ENV: "1", "XMOE_BACKEND": backend})
    return subprocess.run(command + child, env=env).returncode


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def info() -> int:
    """Print the backend, the GPUs, the launcher and the versions of xmoe and its dependencies."""
    print(f"backend: {runtime.default_backend()} (XMOE_BACKEND={os.environ.get('XMOE_BACKEND', '') or 'unset'})")
    print(f"GPUs visible: {runtime.gpu_count()}")
    try:
        print(f"launcher: {' '.join(runtime.launcher_command(2, runtime.default_backend()))}")
    except RuntimeError as exc:
        print(f"launcher: {exc}")
    for package in ("xmoe", "numpy", "numba-cuda", "mpi4py", "ml_dtypes", "mpich", "cupy-cuda12x", "cupy-cuda13x",
                    "nvshmem4py-cu12", "nvshmem4py-cu13", "torch", "jax"):
        print(f"{package:>16}: {_version(package)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmoe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="layout -> dispatch -> toy expert -> combine on several ranks",
        description="Launch the ranks (mpirun on the CPU simulator, torchrun on the GPU), run layout -> dispatch "
                    "-> a toy expert -> combine on bfloat16 tokens and check the result against the NumPy reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    at_least_one = _int_at_least(1)
    demo_parser.add_argument("--ranks", type=at_least_one, default=4, help="ranks (processes) to launch")
    demo_parser.add_argument("--tokens", type=at_least_one, default=64, help="tokens per rank")
    demo_parser.add_argument("--hidden", type=at_least_one, default=128, help="hidden size (elements per token)")
    demo_parser.add_argument("--experts", type=at_least_one, default=16,
                             help="experts in all, split evenly across the ranks (a multiple of --ranks)")
    demo_parser.add_argument("--topk", type=at_least_one, default=4,
                             help="distinct experts each token is sent to (at most --experts)")
    demo_parser.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the random tokens and routing")
    commands.add_parser("info", help="backend, devices and versions")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_demo_args(demo_parser, args)
        return demo(args)
    return info()
