"""``incseg-fast`` (= ``python -m incseg_fast``): train, eval, demo, bench.

Errors: an expected one (a bad or inapplicable option, a missing or damaged file, results of other
options in --out, a diverging loss, no memory left) prints one line, ``incseg-fast: error: <what>``,
on stderr and exits with status 2; ``--debug`` shows its traceback instead. Ctrl-C exits with 130.
Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path

import torch

from ._backends import BackendUnavailableError
from ._errors import OneLineParser
from .train.config import AT_LEAST_ONE, NOT_NEGATIVE, Range, TrainConfig, option_flag, option_type
from .vocabulary import BACKEND_CHOICES

# what a user can cause and fix: bad options or files, other options in --out, divergence, memory
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, BackendUnavailableError, MemoryError)
_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\] [^.]*\. ")


def _no_memory(error: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, Python's and NumPy's MemoryError, or
    the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def _number(kind: type, valid: Range):
    """An argparse type: ``text`` as a ``kind`` (int or float) in ``valid``, else a usage error
    ("argument --lr: must be a finite number > 0, got 'nan'")."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        problem = valid.problem(value, kind)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    return parse


def _step(text: str):
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a step number or 'all', got {text!r}") from None


def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: an absent sub-command --debug keeps the value of a top-level one
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error instead of its one-line message",
    )


def _add_config_options(p: argparse.ArgumentParser, hidden=()) -> None:
    """One option per TrainConfig field: its name, type, default, choices and help are the field's
    (``hidden``: fields whose options a sub-command sets itself, left out of its help)."""
    types = typing.get_type_hints(TrainConfig)
    for option in dataclasses.fields(TrainConfig):
        cli = dict(option.metadata["cli"])
        cli.pop("flag", None)
        flag = option_flag(option.name)
        help_text = argparse.SUPPRESS if option.name in hidden else option.metadata["help"]
        kind, valid = option_type(types[option.name]), option.metadata["valid"]
        if kind is bool and "const" in cli:  # a flag that sets a value over the default None
            p.add_argument(flag, dest=option.name, action="store_const", const=cli["const"], help=help_text)
        elif kind is bool:  # a flag: it turns the default over
            action = "store_false" if option.default else "store_true"
            p.add_argument(flag, dest=option.name, action=action, help=help_text)
        else:
            parse = _number(kind, valid) if valid else kind
            p.add_argument(flag, type=parse, default=option.default, help=help_text, **cli)


def _add_train(p: argparse.ArgumentParser, hidden=()) -> None:
    _add_config_options(p, hidden)
    p.add_argument(
        "--threads",
        type=_number(int, AT_LEAST_ONE),
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)",
    )
    step_help = (
        "step to train (its previous step's checkpoint must exist in --out) or 'all' (default); "
        "joint has one step, the task's last"
    )
    p.add_argument("--step", type=_step, default="all", help=argparse.SUPPRESS if "step" in hidden else step_help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard results in --out that were trained with other options (without it, such a "
        "rerun stops and names the option that differs)",
    )
    _add_debug(p)


def _config(args) -> TrainConfig:
    return TrainConfig(**{option.name: getattr(args, option.name) for option in dataclasses.fields(TrainConfig)})


def _set_threads(threads) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _cmd_train(args) -> int:
    from .train import distributed, run
    from .train.results import PLOT_SKIPPED

    _set_threads(args.threads)
    cfg = _config(args).resolved()
    if distributed.from_environment().is_main:
        from .train.startup import start_line

        print(start_line([cfg]))
    try:
        run(cfg, None if args.step == "all" else [args.step], overwrite=args.overwrite)
    finally:
        distributed.stop()
    if not distributed.from_environment().is_main:
        return 0  # under torchrun, rank 0 alone reports
    out = Path(cfg.out)
    print((out / "results.md").read_text())  # written by the last step, with every method in --out
    if not (out / "miou.png").exists():
        print(PLOT_SKIPPED)
    print(f"results in {out.resolve()} (results.json, results.csv, results.md, miou.png)")
    return 0


def _cmd_eval(args) -> int:
    from .train.trainer import evaluate_checkpoint

    _set_threads(args.threads)
    metrics = evaluate_checkpoint(
        args.checkpoint,
        root=args.root,
        device=args.device,
        amp=args.amp,
        batch_size=args.batch_size,
        workers=args.workers,
        eval_protocol=args.eval_protocol,
    )
    print(json.dumps(metrics, indent=1))
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 0,1,2, got {text!r}") from None


def _cmd_demo(args) -> int:
    from ._environment import source_commit
    from .train.demo import run_demo, run_demo_seeds, seeds_markdown

    commit = source_commit()  # the code that trains, whatever changes while it runs
    options = dict(
        quick=args.quick,
        methods=args.methods.split(","),
        loss_backend=args.loss_backend,
        task=args.task,
        threads=args.threads,
    )
    common = dict(options, progress=not args.no_progress, overwrite=args.overwrite)
    if args.seeds is None:
        seed = 0 if args.seed is None else args.seed
        results = {seed: run_demo(out=args.out, seed=seed, **common)["results"]}
    elif args.seed is not None:
        raise ValueError("--seed and --seeds both given: --seeds runs every seed it names")
    else:
        results = run_demo_seeds(args.seeds, out=args.out, **common)
    if args.markdown:
        print(seeds_markdown(results, commit=commit, **options))
    return 0


ABLATION_SWITCHES = ("kd", "caf_module", "pseudo_labels")  # the options ablate's rows set


def _cmd_ablate(args) -> int:
    from .train.ablate import ABLATIONS, run_ablation

    _set_threads(args.threads)
    if args.method not in ABLATIONS:
        raise ValueError(f"--method {args.method} has no ablation: ablate runs {' or '.join(ABLATIONS)}")
    if args.step != "all":
        raise ValueError("--step does not apply to ablate (every row trains every step of the task)")
    for name in ABLATION_SWITCHES:
        if getattr(args, name) is not None:
            raise ValueError(f"{option_flag(name)} does not apply to ablate (its rows switch it)")
    cfg = _config(args)
    report = run_ablation(cfg, overwrite=args.overwrite)
    print(report["table"])
    print(f"results in {Path(cfg.out).resolve()} (results.json, results.md; one folder per row)")
    return 0


def _cmd_env(args) -> int:
    from ._environment import report

    print("\n".join(report()))
    return 0


def _cmd_bench(rest) -> int:
    from .bench.report import main as report_main  # imported on use: it loads the profiler

    return report_main(rest, prog="incseg-fast bench") or 0


class _VersionAction(argparse.Action):
    """--version: the package, torch and the kernels built (loads the extension, so only when asked)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ._environment import version_text

        print(version_text(parser.prog))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    from .train.demo import DEFAULT_METHODS

    parser = OneLineParser(
        prog="incseg-fast",
        description="Continual (class-incremental) semantic segmentation with fused MiB/ILT/CAF/PLOP losses.",
    )
    parser.add_argument("--version", action=_VersionAction, help="the package's, torch's and the kernels' versions")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,demo,ablate,bench,env}")

    _add_train(
        sub.add_parser(
            "train",
            help="train one step or every step of a task",
            description="Train one step (--step K) or all steps of a task; writes checkpoints, "
            "results.json/.csv/.md and miou.png to --out. Rerunning resumes.",
        )
    )

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Evaluate a final step checkpoint "
        "(OUT/<method>/stepK.pt) on the validation split it was trained for.",
    )
    p.add_argument("checkpoint", help="a stepK.pt file written by train")
    p.add_argument("--root", default=None, help="dataset folder for voc / ade (default: the one used in training)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"), help="mixed precision")
    p.add_argument(
        "--batch-size", type=_number(int, AT_LEAST_ONE), default=None, help="batch size (default: as trained)"
    )
    p.add_argument("--workers", type=_number(int, NOT_NEGATIVE), default=0, help="DataLoader workers")
    p.add_argument(
        "--eval-protocol",
        default=None,
        choices=("mib", "plop"),
        help="unseen classes ignored (mib) or background (plop); default: as trained",
    )
    p.add_argument(
        "--threads", type=_number(int, AT_LEAST_ONE), default=None, help="torch CPU threads (default: torch's choice)"
    )
    _add_debug(p)

    p = sub.add_parser(
        "demo",
        help="synthetic 15-5 disjoint: ft vs mib, caf, plop, ssul, dkd (--methods: any incremental one) vs joint, CPU",
        description="Runs the synthetic 15-5 disjoint task with the methods below and (not "
        "with --quick) the joint upper bound, prints the old/new/all mIoU table and writes "
        "results.json, results.csv, results.md and miou.png.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run without joint (about a minute of one idle core)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: one per variant: runs/demo, runs/demo-quick, runs/demo-15-1, "
        "runs/demo-quick-15-1, ...; with --seeds, runs/demo-seeds and so on, a seed<N> folder per seed)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results of other settings in --out (without it, such a run stops and says what differs)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, NOT_NEGATIVE),
        default=None,
        help="seed of initialisation, data order and scenes (default 0)",
    )
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="run the demo once per seed (e.g. 0,1,2), each in its own folder under --out",
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the results as the README's table: mean ± standard deviation over the seeds, the machine, "
        "and a stamp of the settings and commit",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated incremental methods (the full demo adds joint; default {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--task",
        default="15-5",
        choices=("15-5", "15-1", "19-1", "10-1"),
        help="task (default 15-5; 15-1 adds the five classes one step at a time, six steps)",
    )
    p.add_argument("--loss-backend", default="auto", choices=BACKEND_CHOICES, help="loss implementation (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument(
        "--threads",
        type=_number(int, AT_LEAST_ONE),
        default=1,
        help="torch CPU threads (default 1: robust when other jobs share the cores)",
    )
    _add_debug(p)

    p = sub.add_parser(
        "ablate",
        help="a method's parts on and off: CAF's Table III (--method caf, default) or PLOP's (--method plop)",
        description="--method caf (the default): trains caf with its fusion module (SAB), attentive distillation "
        "(AD) and balanced distillation (BKD) switched on and off (the 8 combinations and the paper's +KD row); "
        "--method plop: plop with its Local POD and its pseudo-labels on and off. Each row in OUT/<row>/ from "
        "one shared step 0; the old/new/all mIoU table goes to results.md/json. The options are train's; "
        "--step, --kd, --no-fusion and --no-pseudo-labels do not apply. Rerunning resumes.",
    )
    _add_train(p, hidden=("method", "step", *ABLATION_SWITCHES))  # the rows set these themselves
    p.set_defaults(method="caf", out="runs/ablate")

    sub.add_parser(
        "bench",
        help="benchmark report (incseg_fast.bench); options after 'bench' go to it",
        description="Runs python -m incseg_fast.bench with the remaining arguments.",
        add_help=False,
    )
    sub.add_parser(
        "env",
        help="what runs where: torch, the kernels built, Triton, each backend and why not, the GPUs",
        description="Prints torch and its CUDA, whether incseg_fast._C has CUDA kernels and for which "
        "architectures, Triton, the CPU kernels' instruction set, each backend available or not (and why), "
        "and the GPUs seen. Include its output in a bug report.",
    )
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # an error in a DataLoader worker comes wrapped in the worker's traceback, whose last
        # line is the original "<type>: <message>"
        text = lines[-1].split(": ", 1)[-1]
    if _no_memory(error):
        text = f"no memory left: {_ENFORCE_PREFIX.sub('', text)} (lower --image-size or --batch-size)"
    return " ".join(text.split())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo, "ablate": _cmd_ablate, "env": _cmd_env}
        return commands[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        resumes = " (rerun the same command to resume)" if args.command in ("train", "demo") else ""
        print(f"incseg-fast: interrupted{resumes}", file=sys.stderr)
        return 130
    except (*EXPECTED_ERRORS, RuntimeError) as error:
        if args.debug or not (isinstance(error, EXPECTED_ERRORS) or _no_memory(error)):
            raise
        print(f"incseg-fast: error: {_one_line(error)}", file=sys.stderr)
        return 2
