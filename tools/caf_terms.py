"""Measure CAF's loss terms one by one while it trains step 1 of the demo (docs/TRAINER.md, "CAF on the
synthetic data").

Trains the step with the trainer itself; every ``--every`` iterations it also takes the gradient of
each weighted term of the objective alone (cross-entropy, logit distillation, attentive distillation
of z-bar and of h) and records its value and the norm of that gradient over the trainable parameters.
Prints, per epoch, the mean of each and the step's mIoU.

    python tools/caf_terms.py --step0 runs/demo/ft/step0.pt --out /tmp/terms [--quick] [--lambda-ad 10] [--gamma logits]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from incseg_fast.reference import balanced_log_gamma
from incseg_fast.train import TrainConfig, methods, train_step, trainer
from incseg_fast.train.demo import FULL, QUICK


def _gamma_of_pooled_probabilities(y):
    with torch.no_grad():
        pooled = y.float().softmax(1).mean((2, 3)).softmax(1)
        return pooled[:, 1:].sum(1) / pooled[:, 0]


GAMMA_READINGS = {
    "share": methods.background_share_gamma,
    "logits": lambda y: balanced_log_gamma(y).exp(),
    "probabilities": _gamma_of_pooled_probabilities,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step0", required=True, help="a trained step-0 checkpoint of the demo's settings")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the quick demo's settings (default: the full demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="caf")
    p.add_argument("--lambda-ad", type=float, default=None)
    p.add_argument("--lambda-kd", type=float, default=None)
    p.add_argument("--kd", default=None, choices=("none", "unbiased", "balanced"))
    p.add_argument("--no-fusion", action="store_true")
    p.add_argument(
        "--gamma",
        default="share",
        choices=sorted(GAMMA_READINGS),
        help="BKD's gamma: share (the trainer's), logits (the library's default: softmax of pooled logits), "
        "probabilities (softmax of pooled probabilities, eq. 11 read literally)",
    )
    p.add_argument("--every", type=int, default=10, help="measure every N iterations (default 10)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = TrainConfig(
        dataset="synthetic",
        task="15-5",
        method=args.method,
        out=args.out,
        backbone="tiny",
        seed=args.seed,
        data_seed=args.seed,
        device="cpu",
        amp="none",
        progress=False,
        step0_checkpoint=args.step0,
        lambda_ad=args.lambda_ad,
        lambda_kd=args.lambda_kd,
        kd=args.kd,
        caf_module=False if args.no_fusion else None,
        **(QUICK if args.quick else FULL),
    )
    measured = defaultdict(list)  # (epoch, term) -> [(value, gradient norm)]
    calls = {"n": 0, "epoch": 0}

    def measuring_loss(cfg, plan, net, model, old, images, labels, weights=(1.0, 1.0)):
        terms = trainer.loss_terms(cfg, plan, net, model, old, images, labels)
        if plan.index > 0 and calls["n"] % args.every == 0:
            params = [q for q in model.parameters() if q.requires_grad]
            for name, term in terms.items():
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                measured[(calls["epoch"], name)].append((term.item(), norm.item()))
        calls["n"] += plan.index > 0
        return sum(terms.values())

    trainer._batch_loss = measuring_loss
    methods.background_share_gamma = GAMMA_READINGS[args.gamma]
    train_step(dataclasses.replace(cfg), 0)
    entry = train_step(cfg, 1, on_epoch_end=lambda epoch: calls.update(epoch=epoch + 1))

    names = sorted({name for _, name in measured}, key=["ce", "kd", "fd", "ad_z", "ad_h"].index)
    print("| epoch | " + " | ".join(f"{n} value | {n} grad" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    summary = {}
    for epoch in sorted({e for e, _ in measured}):
        cells = []
        for name in names:
            pairs = measured[(epoch, name)]
            value = sum(v for v, _ in pairs) / len(pairs)
            grad = sum(g for _, g in pairs) / len(pairs)
            summary[f"{epoch}/{name}"] = (value, grad)
            cells += [f"{value:.3g}", f"{grad:.3g}"]
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    result = {k: round(entry[k], 1) for k in ("miou_old", "miou_new", "miou_all")}
    print("step 1 mIoU old / new / all:", result)
    (Path(args.out) / "terms.json").write_text(json.dumps({"terms": summary, "miou": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
