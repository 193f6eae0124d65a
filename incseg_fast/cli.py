"""``incseg-fast`` (= ``python -m incseg_fast``): train, eval, demo, bench.

Errors: an expected one (a bad or inapplicable option, a missing or damaged file, results of other
options in --out, a diverging loss, no memory left) prints one line, ``incseg-fast: error: <what>``,
on stderr and exits with status 2; ``--debug`` shows its traceback instead. Ctrl-C exits with 130.
Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import __version__
from ._backends import BackendUnavailableError
from .train.config import DATASET_DEFAULTS, METHODS, TrainConfig, per_dataset, per_method
from .vocabulary import BACKEND_CHOICES

# what a user can cause and fix: bad options or files, other options in --out, divergence, memory
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, BackendUnavailableError, torch.OutOfMemoryError)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other expected error (argparse prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"incseg-fast: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="synthetic",
        choices=sorted(DATASET_DEFAULTS),
        help="dataset (default: synthetic, generated in memory; voc/ade need --root)",
    )
    p.add_argument("--root", default=None, help="dataset folder (voc and ade only)")
    p.add_argument(
        "--task",
        default=None,
        help="task: voc/synthetic 19-1, 15-5, 15-1 (=15-5s), 10-1, offline; "
        f"ade 100-50, 100-10, 50-50, 100-5, offline (default: {per_dataset('task')})",
    )
    p.add_argument(
        "--mode",
        default="disjoint",
        choices=("disjoint", "overlapped"),
        help="image selection per step (default: disjoint)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"training crop (voc/ade) or image side (synthetic) (default: {per_dataset('image_size')})",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=TrainConfig.train_images,
        help=f"synthetic only: number of training images (default {TrainConfig.train_images})",
    )
    p.add_argument(
        "--val-images",
        type=int,
        default=TrainConfig.val_images,
        help=f"synthetic only: number of validation images (default {TrainConfig.val_images})",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=TrainConfig.data_seed,
        help=f"synthetic only: seed of the generated scenes (default {TrainConfig.data_seed})",
    )
    p.add_argument(
        "--eval-protocol",
        default="mib",
        choices=("mib", "plop"),
        help="unseen classes at evaluation: ignored (mib, default) or background (plop)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16", "fp16"),
        help="mixed precision: auto = bf16 (fp16 without bf16 support) on CUDA, off on CPU; bf16 also works on CPU",
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {per_dataset('batch_size')})")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--loss-backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="implementation of the losses: auto (fused kernel for the device), reference, "
        "cpu, cuda, triton (default auto)",
    )
    p.add_argument(
        "--materialise-upsampled-logits",
        action="store_true",
        help="upsample the logits to the labels' resolution before the losses (MiB's way) instead of "
        "letting the fused losses upsample them (size=, the default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)",
    )
    _add_debug(p)


def _add_train(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument(
        "--method",
        default="mib",
        choices=sorted(METHODS),
        help="ft, lwf, ilt, mib, caf, or joint (all classes at once, the upper bound); default mib",
    )
    p.add_argument(
        "--step",
        type=_step,
        default="all",
        help="step to train (its previous step's checkpoint must exist in --out) or 'all' (default); "
        "joint has one step, the task's last",
    )
    p.add_argument(
        "--out",
        default="runs/train",
        help="output folder (default runs/train); rerunning the same command there resumes",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard results in --out that were trained with other options (without it, such a "
        "rerun stops and names the option that differs)",
    )
    p.add_argument(
        "--backbone",
        default=None,
        choices=("resnet18", "resnet50", "resnet101", "tiny", "small"),
        help=f"encoder (default: {per_dataset('backbone')})",
    )
    p.add_argument(
        "--output-stride",
        type=int,
        default=None,
        choices=(4, 8, 16),
        help=f"encoder output stride via dilation (default: {per_dataset('output_stride')}; "
        "4 only for the tiny/small backbones)",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="PATH",
        help="resnet backbones: torchvision ImageNet state dict file (torch.save(model.state_dict())); "
        "nothing is downloaded",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of step 0 (default: {per_dataset('epochs')})")
    p.add_argument(
        "--epochs-incremental",
        type=int,
        default=None,
        help="epochs of each later step (default: same as --epochs; not for joint)",
    )
    p.add_argument("--lr", type=float, default=None, help=f"step-0 learning rate (default: {per_dataset('lr')})")
    p.add_argument(
        "--lr-incremental",
        type=float,
        default=None,
        help=f"learning rate of later steps (default: {per_dataset('lr_incremental')}; not for joint)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4)")
    p.add_argument(
        "--lambda-kd", type=float, default=None, help=f"logit distillation weight (default: {per_method('lambda_kd')})"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=TrainConfig.alpha,
        help=f"teacher logit scale of the distillation (lwf, ilt, mib, caf; default {TrainConfig.alpha:g})",
    )
    p.add_argument(
        "--lambda-fd",
        type=float,
        default=None,
        help=f"L2 distillation weight of the encoder output ({per_method('lambda_fd')})",
    )
    p.add_argument("--freeze-encoder", action="store_true", help="ilt only: freeze the encoder in steps > 0 (E_F)")
    p.add_argument(
        "--lambda-ad", type=float, default=None, help=f"attentive distillation weight ({per_method('lambda_ad')})"
    )
    p.add_argument(
        "--step0-checkpoint",
        default=None,
        metavar="PATH",
        help="reuse this trained step-0 checkpoint (same architecture) instead of training step 0",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")


def _config(args) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        task=args.task,
        method=args.method,
        mode=args.mode,
        root=args.root,
        out=args.out,
        backbone=args.backbone,
        output_stride=args.output_stride,
        pretrained=args.pretrained,
        lr=args.lr,
        lr_incremental=args.lr_incremental,
        epochs=args.epochs,
        epochs_incremental=args.epochs_incremental,
        batch_size=args.batch_size,
        image_size=args.image_size,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lambda_kd=args.lambda_kd,
        lambda_fd=args.lambda_fd,
        lambda_ad=args.lambda_ad,
        alpha=args.alpha,
        freeze_encoder=args.freeze_encoder,
        train_images=args.train_images,
        val_images=args.val_images,
        data_seed=args.data_seed,
        eval_protocol=args.eval_protocol,
        amp=args.amp,
        loss_backend=args.loss_backend,
        materialise_upsampled_logits=args.materialise_upsampled_logits,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        step0_checkpoint=args.step0_checkpoint,
        progress=not args.no_progress,
    )


def _set_threads(threads) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _cmd_train(args) -> int:
    from .train import run
    from .train.results import PLOT_SKIPPED

    _set_threads(args.threads)
    cfg = _config(args).resolved()
    run(cfg, None if args.step == "all" else [args.step], overwrite=args.overwrite)
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


def _cmd_demo(args) -> int:
    from .train.demo import run_demo

    run_demo(
        out=args.out,
        quick=args.quick,
        seed=args.seed,
        methods=args.methods.split(","),
        loss_backend=args.loss_backend,
        progress=not args.no_progress,
        threads=args.threads,
    )
    return 0


def _cmd_bench(rest) -> int:
    from .bench.report import main as report_main  # imported on use: it loads the profiler

    return report_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="incseg-fast",
        description="Continual (class-incremental) semantic segmentation with fused MiB/ILT/CAF losses.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,demo,bench}")

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
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: as trained)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument(
        "--eval-protocol",
        default=None,
        choices=("mib", "plop"),
        help="unseen classes ignored (mib) or background (plop); default: as trained",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_debug(p)

    p = sub.add_parser(
        "demo",
        help="synthetic 15-5 disjoint: ft vs mib (vs caf) vs joint on CPU",
        description="Runs the synthetic 15-5 disjoint task with the methods below and (not "
        "with --quick) the joint upper bound, prints the old/new/all mIoU table and writes "
        "results.json, results.csv, results.md and miou.png.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run without joint (about a minute of one idle core)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and scenes (default 0)")
    p.add_argument(
        "--methods",
        default="ft,mib,caf",
        help="comma-separated incremental methods (the full demo adds joint; default ft,mib,caf)",
    )
    p.add_argument("--loss-backend", default="auto", choices=BACKEND_CHOICES, help="loss implementation (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: robust when other jobs share the cores)",
    )
    _add_debug(p)

    sub.add_parser(
        "bench",
        help="benchmark report (incseg_fast.bench); options after 'bench' go to it",
        description="Runs python -m incseg_fast.bench with the remaining arguments.",
        add_help=False,
    )
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # an error in a DataLoader worker comes wrapped in the worker's traceback, whose last
        # line is the original "<type>: <message>"
        text = lines[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo}[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        resumes = " (rerun the same command to resume)" if args.command in ("train", "demo") else ""
        print(f"incseg-fast: interrupted{resumes}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        if args.debug:
            raise
        print(f"incseg-fast: error: {_one_line(error)}", file=sys.stderr)
        return 2
