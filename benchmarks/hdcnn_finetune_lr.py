"""HD-CNN global fine-tuning (METHODS.md §2.3 step 3) at another lr or length, on the cached stages of a
benchmarks/hdcnn.py run.

    python benchmarks/hdcnn_finetune_lr.py --lr 0.001                       # runs/bench_hdcnn_full/full
    python benchmarks/hdcnn_finetune_lr.py --lr 0.001 --weight 0 --rule paper
    python benchmarks/hdcnn_finetune_lr.py --lr 0.005 --epochs 8 --out runs/bench_hdcnn_s1k5 \
        --set hdcnn.num_coarse=5 --set hdcnn.branch_stage=stage1

Stages 1-3 (block, hierarchy, fine components) are loaded from ``<out>/<name>/`` (``--set`` must repeat
the overrides of the run that made them); the fine-tuning is written to
``<out>/<name>/lambda_<w>_<rule>_lr<lr>[_e<epochs>]/`` and the test top-1 is printed.
"""

from __future__ import annotations

import copy
import dataclasses

from coarse2fine.data import class_counts
from coarse2fine.engine.evaluate import evaluate, resolve_device
from coarse2fine.hierarchy import COARSE_TARGET_RULES, coarse_targets
from coarse2fine.recipes.hdcnn import StagePaths, stage_finetune
from hdcnn_stages import load_stages, stages_parser


def main() -> None:
    ap = stages_parser(__doc__)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--weight", type=float, default=20.0, help="lambda of the consistency term")
    ap.add_argument("--rule", choices=COARSE_TARGET_RULES, default="aggregation", help="coarse targets t_k")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the recipe's)")
    args = ap.parse_args()
    cfg, bundle, loaders, pre = load_stages(args)
    epochs = args.epochs if args.epochs is not None else cfg.hdcnn.finetune_epochs
    cfg = dataclasses.replace(
        cfg,
        hdcnn=dataclasses.replace(
            cfg.hdcnn, finetune_lr=args.lr, consistency_weight=args.weight, finetune_epochs=epochs
        ),
    )
    counts = class_counts(bundle.train, len(bundle.classes))
    t = coarse_targets(pre.hierarchy.partial_sets, counts, args.rule)
    model = copy.deepcopy(pre.model)
    suffix = "" if args.epochs is None else f"_e{epochs}"
    folder = cfg.run_dir / f"lambda_{args.weight:g}_{args.rule}_lr{args.lr:g}{suffix}"
    stage_finetune(cfg, model, bundle, loaders, StagePaths(folder), pre.facts, t, resume=True, progress=True)
    res = evaluate(model, loaders.test, num_classes=len(bundle.classes), device=resolve_device(cfg.train.device))
    print(
        f"fine-tuning {epochs} epochs at lr {args.lr:g}, lambda={args.weight:g}, t_k {args.rule}: "
        f"test top-1 {100 * res.top1:.2f} %"
    )


if __name__ == "__main__":
    main()
