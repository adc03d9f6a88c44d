"""``c2f hierarchy``: learn HD-CNN's category hierarchy from a trained block (METHODS.md §2.1).

Softmax of the checkpoint's model on the held-out (validation) split -> confusion matrix -> clustering into
coarse categories -> overlapping partial sets (METHODS.md §2.1). Writes hierarchy.json, hierarchy.png and
hierarchy_report.json, prints the groups and their agreement (ARI / NMI) with the reference taxonomy.
"""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.cli.common import checkpoint_verb
from coarse2fine.hierarchy import CLUSTERING_METHODS
from coarse2fine.recipes.hierarchy import HierarchyRequest, hierarchy_from_checkpoint

HELP = "learn HD-CNN's category hierarchy from a trained building block"


def register(subparsers: Any) -> None:
    h = checkpoint_verb(subparsers, "hierarchy", HELP, __doc__, "a training checkpoint (RUN/checkpoints/best.pt)")
    h.add_argument("--num-coarse", type=int, default=None, help="K (default: the config's hdcnn.num_coarse)")
    h.add_argument(
        "--method",
        choices=CLUSTERING_METHODS,
        default=None,
        help="auto (the candidate below that keeps the most confusion inside its groups, METHODS.md §2.1), "
        "spectral clustering (paper), kNN + Laplacian eigenmap + affinity propagation (authors' code; K is "
        "then an outcome) or average-linkage agglomerative clustering. Default: the config's hdcnn.clustering",
    )
    h.add_argument("--gamma", type=float, default=None, help="u_t = 1/(gamma K) (default: hdcnn.gamma)")
    h.add_argument("--max-partial-size", type=int, default=None, help="cap |S_k| (default: hdcnn.max_partial_size)")
    h.add_argument("--reference", default=None, help="JSON {coarse: [fine, ...]} to compare with")
    h.add_argument("--seed", type=int, default=None, help="clustering seed (default: the config's seed)")
    h.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder)")
    h.set_defaults(func=run_hierarchy)


def run_hierarchy(args: argparse.Namespace) -> int:
    settings = {
        "hdcnn.num_coarse": args.num_coarse,
        "hdcnn.clustering": args.method,
        "hdcnn.gamma": args.gamma,
        "hdcnn.max_partial_size": args.max_partial_size,
    }
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in settings.items() if v is not None)]
    req = HierarchyRequest(
        args.checkpoint, overrides, out=args.out, reference=args.reference, seed=args.seed, progress=not args.quiet
    )
    print_hierarchy_report(hierarchy_from_checkpoint(req))
    return 0


def print_hierarchy_report(report: dict[str, Any]) -> None:
    print(
        f"{report['num_coarse']} coarse categories from {report['num_heldout']} held-out images "
        f"(block top-1 {100 * (report['heldout_top1'] or 0):.2f} %, u_t = {report['u_t']:.4f}):"
    )
    for k, (group, partial) in enumerate(zip(report["groups"], report["partial_sets"])):
        extra = [c for c in partial if c not in group]
        print(f"  {k}: {', '.join(group)}" + (f"  (+ {', '.join(extra)})" if extra else ""))
    sev = report["severity_learnt"]
    print(f"block errors inside a learnt group: {100 * sev['within_fraction']:.1f} %")
    print_quality(report)
    ref = report.get("reference")
    if ref:
        s = ref["scores"]
        print(
            f"versus the reference taxonomy ({s['reference_num_coarse']} groups, {s['classes_compared']} classes): "
            f"ARI {s['ari']:.3f}, NMI {s['nmi']:.3f}, purity {s['purity']:.3f}; block errors inside a "
            f"reference group: {100 * ref['severity']['within_fraction']:.1f} %"
        )
    else:
        print("no reference taxonomy (give --reference FILE.json to compare)")
    for name, path in report.get("paths", {}).items():
        print(f"{name}: {path}")


def _share(kept: float | None) -> str:
    return "n/a" if kept is None else f"{100 * kept:.1f} %"


def print_quality(report: dict[str, Any]) -> None:
    """The partition's quality (METHODS.md eqs. (11a), (11b)) and, for ``auto``, the candidates' scores."""
    q = report.get("quality")
    if q:
        print(
            f"confusion kept inside the groups: {_share(q['confusion_kept'])} of the off-diagonal "
            f"(normalised cut {q['ncut']:.3f})"
        )
    sel = report.get("selection")
    if sel:
        print(f"method {report['method']}: chose {sel['chosen']} among")
        for row in sel["candidates"]:
            if "error" in row:
                print(f"  {row['name']}: failed ({row['error']})")
                continue
            note = "" if row["eligible"] else f" ({row['num_groups']} groups, not eligible)"
            print(f"  {row['name']}: kept {_share(row['confusion_kept'])}, normalised cut {row['ncut']:.3f}{note}")
