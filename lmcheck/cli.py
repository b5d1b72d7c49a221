"""The ``lmcheck`` command: ``lmcheck tutorial``, ``lmcheck check MODEL``, ``lmcheck train-check
package.module:function``, ``lmcheck golden``, ``lmcheck assets ...``.

``train-check`` runs the setup checks on your training setup: the function returns your
``transformers.Trainer``, ``(model, train_step, batches)`` or a mapping of ``check_loop``'s
arguments, and is called again with other seeds for the reproducibility check where it takes a
``seed`` parameter.

Exit status: 0 when every check passed (not-applicable ones aside, and at least one passed), 1
when a check failed, 2 on bad arguments or a model or setup that cannot be loaded, 3 when a check
could not run to a verdict (it raised: an ``error`` result, with the exception and where it came
from; the other checks still ran and printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before torch is imported: idle OpenMP threads sleep rather than spin, which on small or shared
# machines slowed the tutorial's training 2-3x (the measurements: docs/performance.md). Set it
# yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmcheck import assets
from lmcheck._allocator import keep_freed_blocks, release_freed_blocks
from lmcheck.errors import LmcheckError
from lmcheck.recipes import SetupBudget

BUDGET = SetupBudget()  # the setup checks' defaults, said in the help

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    keep_freed_blocks()  # the command owns its process: training steps reuse their freed memory
    try:
        return int(args.handler(args))
    except LmcheckError as error:
        print(f"lmcheck: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcheck", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tutorial = commands.add_parser("tutorial", help="run the four-chapter tutorial on the embedded default")
    tutorial.add_argument("--chapter", type=int, action="append", metavar="N",
                          help="run only chapter N (repeatable; default: all)")
    tutorial.add_argument("--quick", action="store_true", help="smaller runs where a chapter offers them")
    tutorial.add_argument("--out", default="lmcheck-out", help="folder for plots and JSON (default: %(default)s)")
    tutorial.set_defaults(handler=_tutorial)

    check = commands.add_parser("check", help="run the causal- or masked-LM checks on your own model")
    check.add_argument("model", help="a local folder, a name in the Hugging Face cache, 'smollm2', or "
                                     "package.module:function returning a model or (model, tokenizer)")
    check.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                       help="the tokenizer, where a factory returns none (default: gpt2, offline)")
    check.add_argument("--cloze-threshold", type=float, default=None, metavar="ACCURACY",
                       help="masked LMs: a trained model's top-5 cloze accuracy on the wiki sample must "
                            "reach this (default: the model is untrained; its loss at init is checked)")
    check.add_argument("--prompt", action="append", metavar="TEXT",
                       help="prompt to check with (repeatable; default: three English prompts)")
    check.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    check.set_defaults(handler=_check)

    train = commands.add_parser("train-check", help="run the setup checks on your own training setup "
                                                    "(a Trainer or a plain loop)")
    train.add_argument("setup", metavar="package.module:function",
                       help="a function returning your transformers.Trainer, (model, train_step, batches) "
                            "or a mapping of check_loop's arguments; with a 'seed' parameter it is also "
                            "rebuilt per seed for the reproducibility check")
    train.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    train.add_argument("--markdown", metavar="PATH",
                       help="also write the report as Markdown to PATH, the loss curve as a PNG beside it")
    train.add_argument("--steps", type=int, default=None, metavar="N",
                       help=f"optimizer steps of the first run (default {BUDGET.steps})")
    train.add_argument("--overfit-steps", type=int, default=None, metavar="N",
                       help=f"the overfitting run's budget in optimizer steps (default {BUDGET.overfit_steps})")
    train.set_defaults(handler=_train_check)

    golden = commands.add_parser("golden", help="compare the default recipe's losses with this device's golden values")
    golden.add_argument("--update", action="store_true", help="record this device's values instead")
    golden.add_argument("--runs", type=int, default=1, metavar="N",
                        help="with --update: run N times and store a tolerance covering the spread")
    golden.add_argument("--steps", type=int, default=None, metavar="N", help="steps to record (default 10)")
    golden.add_argument("--file", default=None, metavar="PATH", help="golden file (default: lmcheck's own)")
    golden.set_defaults(handler=_golden)

    asset = commands.add_parser("assets", help="list, fetch or verify the offline assets")
    asset.add_argument("action", choices=("list", "fetch", "verify"))
    asset.add_argument("names", nargs="*", help="asset names (default: all)")
    asset.set_defaults(handler=_assets)
    return parser


def _tutorial(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from lmcheck.report import Report, write_results_json
    from lmcheck.tutorial import CHAPTERS, chapter

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would break the tables

    wanted = args.chapter or sorted(CHAPTERS)
    unknown = [n for n in wanted if n not in CHAPTERS]
    if unknown:
        raise LmcheckError(f"'--chapter' must be one of {sorted(CHAPTERS)} (got {unknown})")
    os.makedirs(args.out, exist_ok=True)
    report = Report()
    for number in wanted:
        chapter(number).run(report, quick=args.quick, out=args.out)
        release_freed_blocks()  # each chapter's models go back to the kernel before the next
    ok = report.summary()
    path = write_results_json(report.results, os.path.join(args.out, "tutorial-results.json"))
    report.text(f"results written to {path}")
    return 0 if ok else 1


def _check(args: argparse.Namespace) -> int:
    from lmcheck.batteries import DEFAULT_PROMPTS, iter_checks, load_model_for_checks, model_family
    from lmcheck.report import Report, write_results_json

    model, tokenizer = load_model_for_checks(args.model, args.tokenizer)
    report = Report()
    report.title(f"lmcheck check {args.model} ({model_family(model)} LM)")
    for result in iter_checks(model, tokenizer, args.prompt or DEFAULT_PROMPTS,
                              cloze_threshold=args.cloze_threshold):
        report.result(result)  # printed as it finishes
    ok = report.summary(table=False)  # each result was printed once, as its line
    if args.json:
        report.text(f"results written to {write_results_json(report.results, args.json)}")
    return _exit_status(ok, report.results)


def _exit_status(ok: bool, results: Sequence[Any]) -> int:
    """0 when ``ok``; 3 where a check raised (it could not say), else 1 (a check failed)."""
    if ok:
        return 0
    return 3 if any(r.status == "error" for r in results) else 1


def _train_check(args: argparse.Namespace) -> int:
    import json

    from lmcheck.batteries import run_setup_checks
    from lmcheck.report import Report

    options = {name: value for name, value in (("steps", args.steps), ("overfit_steps", args.overfit_steps))
               if value is not None}
    with _StepProgress(quiet=_rank() > 0) as progress:
        checked = run_setup_checks(args.setup, progress=progress, **options)
    if _rank() > 0:  # under torchrun every rank holds the same report: rank 0 prints and writes it
        return 0 if checked.passed else 1
    report = Report()
    report.title(f"lmcheck train-check {args.setup}")
    report.text(", ".join(f"{name}: {value}" for name, value in checked.setup.items()))
    report.results.extend(checked.results)
    ok = report.summary()  # the table: one row per check
    report.text(f"the checks ran {checked.optimizer_steps} optimizer steps of the setup in {checked.seconds:.1f} s")
    for result in checked.failures():  # the table shortens explanations: a failure's in full
        report.text(f"FAIL {result.name}: {result.explanation}")
    for result in checked.errors():
        report.text(f"ERROR {result.name}: {result.error}")
    if args.markdown:
        report.text(f"report written to {checked.to_markdown(args.markdown)}")
    if args.json:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(checked.to_dict(), indent=2, default=str))
        report.text(f"report written to {target}")
    return _exit_status(ok, checked.results)


def _rank() -> int:
    """This process's rank under torchrun or accelerate launch; 0 in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _StepProgress:
    """A rich progress bar per phase of the setup checks, over its optimizer steps, on stderr;
    silent where stderr is not a terminal, and on every rank but 0 under torchrun. Called as
    ``progress(phase, done, total)``."""

    def __init__(self, *, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("optimizer steps"), TimeElapsedColumn(), console=console,
                            transient=True, disable=quiet or not console.is_terminal)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _StepProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self.tasks.get(phase)
        if task is None:
            task = self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(task, completed=done, total=total)


def _golden(args: argparse.Namespace) -> int:
    from lmcheck import golden
    from lmcheck.loops.pretraining import default_recipe_curve

    path = args.file or golden.DEFAULT_GOLDEN
    steps = args.steps or golden.GOLDEN_STEPS
    if args.runs < 1:
        raise LmcheckError(f"'--runs' must be at least 1 (got {args.runs})")
    if args.update and args.file is None and golden.installed_read_only():
        raise LmcheckError(
            f"'lmcheck golden --update' would write into the installed package ({path}); record "
            f"into a file of your own with --file PATH, or run from a source checkout of lmcheck")
    if args.update:
        curves = [default_recipe_curve(steps) for _ in range(args.runs)]
        entry = golden.record_golden(curves, path, steps=steps, recipe=golden.RECIPE)
        print(f"recorded {steps} losses for {golden.device_key()} in {path} "
              f"(rtol {entry['rtol']:g}, measured spread {entry['measured_spread']:.3g} over {args.runs} runs)")
        return 0
    result = golden.matches_golden(default_recipe_curve(steps), path)
    print(result)
    return 0 if result else 1


def _assets(args: argparse.Namespace) -> int:
    names = args.names or sorted(assets.ASSETS)
    for name in names:
        if name not in assets.ASSETS:
            raise assets.AssetError(f"unknown asset {name!r}: names must be among {', '.join(sorted(assets.ASSETS))}")
    if args.action == "list":
        print(f"cache: {assets.cache_dir()}")
        for name in names:
            a = assets.ASSETS[name]
            print(f"{name:28} {a.package}=={a.version:10} {a.license:28} {a.description}")
        return 0
    if args.action == "fetch":
        for name in names:
            assets.asset_path(name, progress=lambda line: print(line, flush=True))
        # and what is made from them on first use, so that no chapter or test pays for it
        from lmcheck.corpus import WIKI_DUMP_ASSET, load_documents
        from lmcheck.models import SMOLLM2_ASSET, smollm2_folder

        if WIKI_DUMP_ASSET in names:
            print(f"{WIKI_DUMP_ASSET}: parsed, {len(load_documents('wiki-sample'))} articles", flush=True)
        if SMOLLM2_ASSET in names:
            print(f"{SMOLLM2_ASSET}: converted to safetensors in {smollm2_folder()}", flush=True)
        return 0
    bad = 0
    for name in names:
        state = assets.verify(name)
        message = {"ok": "ok (sha256 matches)", "missing": "missing (run 'lmcheck assets fetch')",
                   "corrupt": "CORRUPT: sha256 mismatch, file deleted; 'lmcheck assets fetch' gets it again"}[state]
        print(f"{name:28} {message}")
        bad += state != "ok"
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
