"""Run one benchmark function under this tree's archkit and under a baseline commit's.

A benchmark that compares "before" with "now" in one run imports archkit twice, which one
process cannot: ``baseline_checkout`` checks the baseline commit out with ``git worktree``
into a temporary folder, and ``in_worker`` runs the calling script again as a worker
(``--worker JSON``) with ``PYTHONPATH`` naming the tree whose archkit it must import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the commit before the speed work of issue 16: the "old path" its targets are set against
DEFAULT_BASELINE = "f3f28ce"
VARIANTS = ("baseline", "eager", "compiled")


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--baseline REV``, ``--no-compile`` and the hidden ``--worker JSON``."""
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def variants_or_work(args: argparse.Namespace, run_worker: Callable[..., dict]
                     ) -> list[str] | None:
    """In a worker (``--worker``): run ``run_worker`` on its config, print the result as
    JSON and return None. Otherwise the variants to compare."""
    if args.worker:
        print(json.dumps(run_worker(**json.loads(args.worker))))
        return None
    return [v for v in VARIANTS if not (args.no_compile and v == "compiled")]


@contextlib.contextmanager
def baseline_checkout(revision: str) -> Iterator[Path]:
    """A detached worktree of ``revision``, removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        revision], check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], check=False, capture_output=True)


def in_worker(script: str, tree: Path, config: dict[str, object]) -> dict[str, object]:
    """``script --worker JSON(config)`` in a fresh process importing archkit from ``tree``;
    its last line of output, parsed as JSON, must name that archkit under ``archkit``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(config)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"worker failed for {config}:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["archkit"]).is_relative_to(tree):  # the tree's, not an installed one
        sys.exit(f"the worker imported archkit from {result['archkit']}, not from {tree}")
    return result


def archkit_folder() -> str:
    """Where this process imported archkit from (a worker reports it)."""
    import archkit

    return str(Path(archkit.__file__).parent)
