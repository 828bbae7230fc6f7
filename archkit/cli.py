"""The ``archkit`` command.

Every user mistake (a bad spec, an unknown name) prints one readable paragraph on
stderr and exits with status 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from archkit import __version__
from archkit.metrics import METRICS, SECTIONS, lookup
from archkit.pretrained.source import PretrainedError
from archkit.registry import REGISTRIES, RegistryError
from archkit.searching.backends import BACKENDS
from archkit.spec import SpecError, load_spec

if typing.TYPE_CHECKING:
    from archkit.experiment import Experiment

USAGE_ERROR = 2
INTERRUPTED = 130
DEFAULT_WINDOW = 1024
DEFAULT_RUNS = Path("runs")
console = Console(width=None if sys.stdout.isatty() else 120)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError("--set", "KEY=VALUE with a dotted key, e.g. model.d_model=128",
                            pair, file="<command line>")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def cmd_build(args: argparse.Namespace) -> None:
    import torch

    from archkit.card import model_card, require_memory
    from archkit.cost import cost_plan, wall_clock_hours
    from archkit.model import HybridModel

    if args.plan is not None and args.device_tflops is None:
        raise SpecError("--device-tflops", "the device's peak TFLOP/s (e.g. its bf16 dense "
                        "rate) to turn --plan into hours", file="<command line>")
    spec = load_spec(args.spec, parse_overrides(args.set))
    require_memory(spec.model, torch.device("cpu"), training=False)
    model = HybridModel.uninitialised(spec.model)
    window = args.window or (spec.sleep.window if spec.sleep else DEFAULT_WINDOW)
    card = model_card(model, window, spec.sleep)
    if spec.task is not None and spec.sleep is not None:
        card["plan"] = cost_plan(model, spec)
        if args.plan is not None:
            card["plan"]["plan_hours"] = wall_clock_hours(
                card["plan"]["train_flops_per_token"], args.plan, args.device_tflops, args.mfu)
            card["plan"]["settings"] = {"tokens": args.plan, "device_tflops": args.device_tflops,
                                        "mfu": args.mfu}
    elif args.plan is not None:
        raise SpecError("task", "a `task:` and a `sleep:` section for --plan", file=args.spec)
    if args.json:
        print(json.dumps({"name": spec.name, **card}, indent=2))
        return
    table = Table(title=f"{spec.name}: {args.spec}", title_justify="left")
    for column in ("layer", "block", "mlp", "params", "fast weights", "KV / token",
                   f"state (L={card['window']})"):
        left = column in ("block", "mlp")
        table.add_column(column, justify="left" if left else "right")
    for layer in card["layers"]:
        table.add_row(
            str(layer["index"]), layer["block"], "yes" if layer["mlp"] else "no",
            f"{layer['params']:,}", _bytes(layer["fast_weight_bytes"]),
            _bytes(layer["kv_bytes_per_token"]), _bytes(layer["state_bytes_per_sequence"]),
        )
    console.print(table)
    console.print(
        f"parameters        {card['params']:,} ({card['embedding_params']:,} in the embedding)\n"
        f"dtype             {card['dtype']}\n"
        f"fast-weight state {_bytes(card['fast_weight_bytes'])} per sequence\n"
        f"KV cache          {_bytes(card['kv_bytes_per_token'])} per token, at most "
        f"{_bytes(card['kv_bytes_window'])} for a window of L={card['window']}\n"
        f"FLOPs per token   {card['flops_per_token'] / 1e6:.2f} M (window L={card['window']})"
    )
    sleep = card["sleep"]
    if sleep is None:
        console.print(f"sleep             none in the spec (L={window} assumed above)")
        return
    loop = sleep["loop_layers"]
    console.print(
        f"sleep             {sleep['controller']} {sleep['options']}, {sleep['eviction']} "
        f"eviction, layers {loop[0]}..{loop[-1]} loop\n"
        f"sleep cost        {sleep['sleep_flops_per_pass'] / 1e6:.2f} MFLOP per looping pass over "
        f"a full window; wake reads each token in one pass whatever N"
    )
    if "plan" in card:
        print_plan(card["plan"])


def print_plan(plan: dict[str, Any]) -> None:
    """The cost plan of ``archkit build`` (``archkit/cost.py``)."""
    console.print(
        f"training          {plan['train_flops_per_token'] / 1e6:.2f} MFLOP per token "
        f"(sequences of {plan['tokens_per_sequence']:,} tokens: {plan['slept_tokens']:,} slept "
        f"on, {plan['awake_tokens']:,} awake; forward, backward and recompute)\n"
        f"activations       {_bytes(plan['activation_bytes_full'])} per example through "
        f"every pass, {_bytes(plan['activation_bytes_checkpointed'])} with sleep.checkpoint"
    )
    if "plan_hours" in plan:
        settings = plan["settings"]
        console.print(
            f"plan              {settings['tokens']:.3g} tokens at {settings['device_tflops']:g} "
            f"TFLOP/s x MFU {settings['mfu']:g}: {plan['plan_hours']:,.1f} hours on one device")


def cmd_blocks(args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({registry.kind: [
            {"name": entry.name, "description": entry.description,
             "config": json.loads(json.dumps(entry.config.model_json_schema(), default=str))}
            for entry in registry] for registry in REGISTRIES}, indent=2))
        return
    for registry in REGISTRIES:
        table = Table(title=f"{registry.kind}s", title_justify="left", show_lines=True)
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("config fields")
        for entry in registry:
            table.add_row(entry.name, entry.description, _fields(entry.config))
        console.print(table)


def detach(log: Path) -> None:
    """Run this same command again in a new session, immune to the terminal closing, with
    its output in ``log``. Return once it has started a run (it creates the file named in
    ``STARTED_FILE_ENV``) or has exited, and say which: a process that exits first has its
    output repeated here and its exit status becomes this command's."""
    from archkit.trainer import STARTED_FILE_ENV

    argv = [a for a in sys.argv[1:] if a != "--background"]
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError("--runs", f"a directory for runs and their logs ({err.strerror})",
                        str(log.parent), file="<command line>") from None
    earlier_output = log.stat().st_size if log.exists() else 0
    with tempfile.TemporaryDirectory(prefix="archkit-detach-") as folder:
        started = Path(folder) / "started"
        with open(log, "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "archkit.cli", *argv, "--no-progress"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, STARTED_FILE_ENV: str(started)})
        try:
            while child.poll() is None and not started.exists():
                time.sleep(0.1)
        except KeyboardInterrupt:
            print(f"archkit: stopped waiting for pid {child.pid} to start its run; it goes on, "
                  f"with its output in {log}", file=sys.stderr)
            sys.exit(INTERRUPTED)
    status = child.poll()
    if status is None:
        console.print(f"running in the background as pid {child.pid}; output in {log}. "
                      "Stop it with kill -INT (it saves a checkpoint); run the same command "
                      "again (with --resume for train) to continue.")
        return
    with open(log, "rb") as f:
        f.seek(earlier_output)
        output = f.read().decode(errors="replace").rstrip("\n")
    if status != 0:
        print(output, file=sys.stderr)
        sys.exit(status if status > 0 else 128 - status)  # killed by signal -status
    print(output)
    console.print(f"finished at once (exit status 0); output in {log}")


def resume_command(runs: Path, name: str) -> str:
    """The command that resumes run ``name`` from its stored spec, as a shell line."""
    where = [] if runs == DEFAULT_RUNS else ["--runs", str(runs)]
    return shlex.join(["archkit", "train", "--resume", "--name", name, *where])


def cmd_train(args: argparse.Namespace) -> None:
    from archkit.checkpoint import has_checkpoint, load_run_spec, saved_step
    from archkit.distributed import process_group
    from archkit.spec import TrainSpec
    from archkit.trainer import TrainingDiverged, resolve_device, train

    overrides = parse_overrides(args.set)
    if args.runs.exists() and not args.runs.is_dir():
        raise SpecError("--runs", "a directory for runs; this is a file", str(args.runs),
                        file="<command line>")
    if args.spec is not None:
        spec = load_spec(args.spec, overrides)
    elif args.resume and args.name:
        spec = load_run_spec(args.runs / args.name, overrides)
    else:
        raise SpecError("spec", "a spec file (only --resume --name NAME may leave it out: "
                        "that run's stored spec is used)", file="<command line>")
    name = args.name or spec.name
    run_dir = args.runs / name
    if args.background:
        detach(run_dir.with_name(run_dir.name + ".log"))
        return
    try:
        train_spec = spec.train or TrainSpec()
        with process_group(resolve_device(train_spec), train_spec.parallel) as layout:
            result = train(spec, run_dir, resume=args.resume,
                           progress=not args.no_progress and layout.writer, layout=layout)
    except TrainingDiverged as err:
        print(f"archkit: {err}", file=sys.stderr)
        sys.exit(1)
    if not layout.writer:  # rank 0 says how it went
        sys.exit(INTERRUPTED if result.interrupted else 0)
    if result.interrupted:
        if has_checkpoint(run_dir):
            print(f"archkit: interrupted; the checkpoint of step {saved_step(run_dir)} is in "
                  f"{run_dir}. Continue with: {resume_command(args.runs, name)}",
                  file=sys.stderr)
        else:
            print("archkit: interrupted before the first checkpoint; nothing was saved",
                  file=sys.stderr)
        sys.exit(INTERRUPTED)
    if result.already_finished:
        print(f"{run_dir} has finished (final.json); nothing to do. To train it further: "
              f"{resume_command(args.runs, name)} --set train.steps=N with N above "
              f"{spec.train.steps if spec.train else 0}")
        return
    console.print(f"run saved in {run_dir}  (tensorboard --logdir {args.runs})")


def cmd_eval(args: argparse.Namespace) -> None:
    from archkit.checkpoint import load_run
    from archkit.evaluation import evaluate_run, evaluate_spec
    from archkit.tracking import score_table

    overrides = parse_overrides(args.set)
    if args.passes is not None:
        overrides["sleep.passes"] = args.passes
    if args.controller is not None:
        overrides["sleep.controller"] = args.controller
    if Path(args.run).is_file():  # a spec: its model untrained, e.g. a pretrained zero-shot
        spec = load_spec(args.run, overrides)
        result = evaluate_spec(spec, args.seed)
    else:
        run = load_run(args.run, overrides)
        spec, result = run.spec, evaluate_run(run, args.seed)
    if args.json:
        print(json.dumps(result.metrics(), indent=2))
        return
    assert spec.sleep is not None
    title = (f"{args.run}: {spec.sleep.controller} sleep, N={spec.sleep.passes}, "
             f"loss {result.loss:.4f}")
    console.print(score_table(result, title))


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from archkit.bench import bench_inputs, measure
    from archkit.checkpoint import load_run
    from archkit.sleep import SleepingModel

    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.target.is_dir():
        run = load_run(args.target, overrides)
        spec, sleeper = run.spec, run.model
    else:
        spec = load_spec(args.target, overrides)
        sleeper = SleepingModel.from_spec(spec)
    if args.compile:
        sleeper.model.compile_passes()
    figures = measure(sleeper, *bench_inputs(spec), decode_tokens=args.decode)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    settings = figures.pop("settings")
    table = Table(title=f"{spec.name}: wake and sleep on {args.threads} threads "
                        f"({settings['context_tokens']} context tokens, "
                        f"{settings['decode_tokens']} decode steps timed)",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name, value in figures.items():
        table.add_row(name, f"{value:,.3f}" if isinstance(value, float) else f"{value:,}",
                      lookup(name).unit)
    console.print(table)


def cmd_metrics(args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in METRICS], indent=2))
        return
    table = Table(title="metrics (TensorBoard: <section>/<name>, sections: "
                        f"{', '.join(SECTIONS)})", title_justify="left")
    for column in ("name", "unit", "direction", "from", "meaning"):
        table.add_column(column)
    for metric in METRICS:
        table.add_row(metric.name, metric.unit, metric.direction or "-",
                      ", ".join(metric.sources), metric.meaning)
    console.print(table)


def cmd_experiment(args: argparse.Namespace) -> None:
    from archkit.experiment import check_arm_names, load_experiment, run_experiment

    experiment = load_experiment(args.experiment)
    if args.arms is not None:
        check_arm_names(experiment, args.arms)
    root = args.runs / experiment.name
    if args.background:
        detach(root.with_name(root.name + ".log"))
        return
    try:
        run_experiment(experiment, args.runs, progress=not args.no_progress,
                       train_missing=not args.report_only, verbose=args.verbose,
                       workers=experiment_workers(args.workers, experiment),
                       only=args.arms)
    except KeyboardInterrupt:
        print(f"archkit: interrupted; finished runs are kept in {root}. Run the same command "
              "again to resume.", file=sys.stderr)
        sys.exit(INTERRUPTED)
    console.print((root / "report.md").read_text())
    console.print(f"written: {root / 'report.md'}, {root / 'report.png'}, "
                  f"{root / 'summary.json'}; tensorboard --logdir {root / 'runs'}")


def experiment_workers(asked: int | None, experiment: Experiment) -> int:
    """``--workers``: as asked, or (auto, None) one per free core of the base spec's
    ``train.threads``."""
    if asked is not None:
        return asked
    from archkit.workers import free_cores

    base = experiment.spec({}, "base")
    assert base.train is not None
    return max(1, free_cores() // (base.train.threads or os.cpu_count() or 1))


def cmd_search(args: argparse.Namespace) -> None:
    from archkit.searching import load_space, run_search

    space = load_space(args.space, parse_overrides(args.set), args.name)
    if args.trials is not None:
        space = space.model_copy(update={"budget": space.budget.model_copy(
            update={"trials": args.trials})})
    if args.background:
        detach(args.runs / f"{space.name}.log")
        return
    try:
        run_search(space, args.runs, args.backend, args.workers, args.address,
                   progress=not args.no_progress, storage=args.storage, verbose=args.verbose)
    except KeyboardInterrupt:
        print(f"archkit: interrupted; finished trials are kept in {args.runs / space.name}. "
              f"Run the same command again to resume.", file=sys.stderr)
        sys.exit(INTERRUPTED)
    if args.json:
        print(json.dumps(pareto_json(args.runs / space.name), indent=2))
        return
    _print_front(args.runs / space.name)


def cmd_studies(args: argparse.Namespace) -> None:
    from archkit.searching.run import list_studies

    studies = list_studies(args.runs)
    if args.json:
        print(json.dumps(studies, indent=2))
        return
    table = Table(title=f"searches in {args.runs}", title_justify="left")
    columns = ("name", "backend", "storage", "complete", "failed", "stopped", "budget",
               "on_front")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for study in studies:
        table.add_row(*(str(study[c]) for c in columns))
    console.print(table if studies else f"no searches in {args.runs}")


def cmd_pareto(args: argparse.Namespace) -> None:
    from archkit.searching import load_search
    from archkit.searching.pareto import front_markdown, write_reports

    space, results = load_search(args.run)
    write_reports(args.run, results, space)
    if args.json:
        print(json.dumps(pareto_json(args.run), indent=2))
        return
    if args.markdown:
        print(front_markdown(results, space))
        return
    _print_front(args.run)


def cmd_compare(args: argparse.Namespace) -> None:
    from archkit.searching.summary import (
        load_searches,
        plot_summary,
        summarise,
        summary_markdown,
    )

    searches = load_searches(args.searches)
    rows = summarise(searches)
    if not rows:
        raise SpecError("", "no complete trials in these searches")
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        plot_summary(searches).savefig(args.figure, dpi=120, bbox_inches="tight")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(summary_markdown(rows))
    if args.figure is not None:
        print(f"written: {args.figure}")


def pareto_json(root: Path) -> dict[str, Any]:
    """A search's objectives and every trial's record, with ``on_front``."""
    from archkit.searching import load_search
    from archkit.searching.pareto import front_of

    space, results = load_search(root)
    on_front = {r["trial"] for r in front_of(results, space.metrics, space.directions)}
    return {"name": space.name, "objectives": space.metrics, "directions": space.directions,
            "trials": [{**r, "on_front": r["trial"] in on_front} for r in results]}


def _print_front(root: Path) -> None:
    from archkit.searching import front_table, load_search

    space, results = load_search(root)
    states = {s: sum(r["state"] == s for r in results) for s in ("complete", "failed", "stopped")}
    console.print(front_table(results, space, f"{space.name}: Pareto front"))
    console.print(", ".join(f"{n} {s}" for s, n in states.items() if n) or "no finished trials")
    for r in results:
        if r["state"] == "failed":
            console.print(f"  trial {r['trial']} failed: {r['reason']}")
    written = [name for name in ("pareto.csv", "pareto.png") if (root / name).exists()]
    console.print(f"written: {', '.join(str(root / n) for n in written)}; "
                  f"tensorboard --logdir {root}")


def cmd_tasks_show(args: argparse.Namespace) -> None:
    from archkit.tasks import get_task, show

    overrides = parse_overrides(args.set)
    if args.json:
        task = get_task(args.name, preset=args.preset, **overrides)
        print(json.dumps({"task": args.name, "settings": task.config.model_dump(mode="json"),
                          "difficulty_name": task.difficulty_name,
                          "examples": task.as_records(task.sample(args.n, args.seed))},
                         indent=2))
        return
    print(show(args.name, n=args.n, seed=args.seed, preset=args.preset, **overrides))


def _fields(config: type[BaseModel]) -> str:
    lines = []
    for name, field in config.model_fields.items():
        default = "required" if field.is_required() else repr(field.default)
        note = f"  ({field.description})" if field.description else ""
        if field.is_required() and note.startswith("  (default: "):
            default, note = note.removeprefix("  (default: ")[:-1], ""
        lines.append(f"{name}: {_type_name(field.annotation)} = {default}{note}")
    return "\n".join(lines) or "-"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _workers(text: str) -> int | None:
    """``auto`` (None: one worker per free core) or a positive number."""
    if text == "auto":
        return None
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer, got {text}"
                                         ) from None


def _names(text: str) -> list[str]:
    """A comma-separated list of names (``--arms N1,N1x2``)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted spec key, e.g. sleep.passes=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archkit", description="Build and search hybrid language models that sleep."
    )
    parser.add_argument("--version", action="version", version=f"archkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="validate a spec, build the model, print its card")
    build.add_argument("spec", help="a model spec YAML file")
    build.add_argument("--json", action="store_true", help="print the card as one JSON object")
    build.add_argument("--window", type=_positive_int, default=None,
                       help=f"attention window L for the KV bound and FLOPs (default: the "
                            f"spec's sleep.window, else {DEFAULT_WINDOW})")
    build.add_argument("--plan", type=_positive_float, default=None, metavar="TOKENS",
                       help="estimate the hours to train on TOKENS tokens (needs a task)")
    build.add_argument("--device-tflops", type=_positive_float, default=None,
                       help="peak TFLOP/s of one device, for --plan")
    build.add_argument("--mfu", type=_fraction, default=0.3,
                       help="model FLOP utilisation assumed by --plan (default 0.3)")
    add_set(build)
    build.set_defaults(handler=cmd_build)

    blocks = commands.add_parser("blocks", help="list registered blocks, rules, controllers, tasks")
    blocks.add_argument("--json", action="store_true", help="the registries as JSON")
    blocks.set_defaults(handler=cmd_blocks)

    metrics = commands.add_parser("metrics", help="every metric archkit records: name, unit, "
                                                  "direction, source, meaning")
    metrics.add_argument("--json", action="store_true", help="the table as JSON")
    metrics.set_defaults(handler=cmd_metrics)

    train = commands.add_parser("train", help="train and evaluate a spec; logs to runs/NAME")
    train.add_argument("spec", nargs="?",
                       help="a spec with model, sleep, task and train sections (with "
                            "--resume --name NAME: optional, the run's stored spec)")
    train.add_argument("--name", help="run name (default: the spec's name)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run's checkpoint; the spec must resolve to the "
                            "stored one, except a larger train.steps, which extends the run")
    train.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="runs directory")
    train.add_argument("--no-progress", action="store_true", help="no live progress bar")
    train.add_argument("--background", action="store_true",
                       help="detach from the terminal; output in RUNS/NAME.log")
    add_set(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="re-evaluate a run, at any sleep setting")
    evaluate.add_argument("run", type=Path, help="a run directory, e.g. runs/rule110_cpu, or a "
                          "spec file: its model untrained (a pretrained model zero-shot)")
    evaluate.add_argument("--passes", type=_positive_int, help="sleep passes N to evaluate at")
    evaluate.add_argument("--controller", help="another sleep controller, e.g. adaptive")
    evaluate.add_argument("--seed", type=int, help="evaluation seed (default: the run's)")
    evaluate.add_argument("--json", action="store_true")
    add_set(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="wake latency, sleep cost and memory")
    bench.add_argument("target", type=Path, help="a spec file or a run directory")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--threads", type=_positive_int, default=2)
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile the wake step and the sleep passes first (the "
                            "warm-up compiles; eager where compiling fails)")
    bench.add_argument("--decode", type=_positive_int, default=None,
                       help="decode steps timed (default: 4 windows and one token, so the "
                            "figures include 4 boundary stalls)")
    add_set(bench)
    bench.set_defaults(handler=cmd_bench)

    search = commands.add_parser("search", help="search a space for the Pareto front")
    search.add_argument("space", type=Path, help="a search-space YAML, e.g. "
                                                 "search_spaces/sleep_n.yaml")
    search.add_argument("--backend", choices=list(BACKENDS), default="optuna",
                        help="optuna: embedded, on-disk study (default); ray: Ray Tune")
    search.add_argument("--workers", type=_workers, default=None, metavar="auto|N",
                        help="local worker processes (optuna backend); auto (default): one "
                             "per free core, no more than trials left")
    search.add_argument("--address", help="Ray cluster address, e.g. auto (ray backend)")
    search.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///runs/s.db "
                                          "(default: RUNS/NAME/study.journal; a rerun uses "
                                          "the search's own)")
    search.add_argument("--name", help="the search's name (default: the space's): its "
                                       "directory under RUNS")
    add_set(search)
    search.add_argument("--trials", type=_positive_int,
                        help="the budget in trials, overriding the space's; a rerun with a "
                             "larger number extends the search")
    search.add_argument("--runs", type=Path, default=Path("runs"), help="runs directory")
    search.add_argument("--no-progress", action="store_true",
                        help="no live progress bar (it goes to stderr)")
    search.add_argument("-v", "--verbose", action="store_true",
                        help="print each trial's final evaluation by difficulty")
    search.add_argument("--json", action="store_true",
                        help="at the end, every trial's record with on_front as JSON on "
                             "stdout (as archkit pareto --json)")
    search.add_argument("--background", action="store_true",
                        help="detach from the terminal; output in RUNS/NAME.log")
    search.set_defaults(handler=cmd_search)

    studies = commands.add_parser("studies", help="the searches under RUNS: trials done, "
                                                  "budget, front size, storage")
    studies.add_argument("--runs", type=Path, default=Path("runs"), help="runs directory")
    studies.add_argument("--json", action="store_true")
    studies.set_defaults(handler=cmd_studies)

    experiment = commands.add_parser(
        "experiment", help="train arms that differ in sleep passes, over seeds; report")
    experiment.add_argument("experiment", type=Path, help="an experiment YAML, e.g. "
                                                          "experiments/sleep_passes.yaml")
    experiment.add_argument("--runs", type=Path, default=Path("runs"), help="runs directory")
    experiment.add_argument("--no-progress", action="store_true",
                            help="no live progress bar (it goes to stderr)")
    experiment.add_argument("-v", "--verbose", action="store_true",
                            help="print each run's final evaluation by difficulty")
    experiment.add_argument("--background", action="store_true",
                            help="detach from the terminal; output in RUNS/NAME.log")
    experiment.add_argument("--workers", type=_workers, default=1, metavar="auto|N",
                            help="runs trained at once, each in its own process (auto: "
                                 "one per free core, by the runs' train.threads; default 1)")
    experiment.add_argument("--report-only", action="store_true",
                            help="train nothing: report the runs that have finished")
    experiment.add_argument("--arms", type=_names, default=None, metavar="A,B",
                            help="train only these arms (and the learning-rate runs); the "
                                 "report covers every finished run")
    experiment.set_defaults(handler=cmd_experiment)

    pareto = commands.add_parser("pareto", help="a search's front: table, pareto.csv, .png")
    pareto.add_argument("run", type=Path, help="a search directory, e.g. runs/sleep_n")
    pareto.add_argument("--json", action="store_true",
                        help="every trial's record with on_front, as JSON")
    pareto.add_argument("--markdown", action="store_true",
                        help="every complete trial as a Markdown table, chance beside exact")
    pareto.set_defaults(handler=cmd_pareto)

    compare = commands.add_parser(
        "compare", help="searches side by side, by task: best exact at equal wake latency")
    compare.add_argument("searches", type=Path, nargs="+",
                         help="search directories, e.g. runs/interleave runs/depo_interleave")
    compare.add_argument("--figure", type=Path, help="also write the figure (PNG) here")
    compare.add_argument("--json", action="store_true", help="the rows as JSON")
    compare.set_defaults(handler=cmd_compare)

    tasks = commands.add_parser("tasks", help="look at the tasks").add_subparsers(
        dest="tasks_command", required=True, metavar="ACTION")
    show = tasks.add_parser("show", help="print decoded examples with answers and difficulty")
    show.add_argument("name", help="a registered task (see `archkit blocks`)")
    show.add_argument("--preset", choices=["cpu", "paper"], default="cpu")
    show.add_argument("-n", type=_positive_int, default=3, help="examples (default 3)")
    show.add_argument("--json", action="store_true", help="the examples as JSON")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a task field, e.g. steps=8 (repeatable)")
    show.set_defaults(handler=cmd_tasks_show)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except (SpecError, RegistryError, PretrainedError) as err:
        print(f"archkit: error: {err}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        print("archkit: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
