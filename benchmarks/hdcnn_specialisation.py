"""Do HD-CNN's fine components specialise? Each pre-trained F_k against the building block restricted to S_k.

On the images whose label is in a partial set S_k (held-out or test split), compare the top-1 of the
pre-trained fine component F_k (METHODS.md §2.3 step 2) with the building block's argmax over the classes
of S_k only. HD-CNN can only beat its block where F_k beats the block on its own classes.

    python benchmarks/hdcnn_specialisation.py --out runs/bench_hdcnn_s1k5 \\
        --set hdcnn.num_coarse=5 --set hdcnn.branch_stage=stage1

Stages are loaded from ``<out>/<name>/`` of a benchmarks/hdcnn.py run (``--set`` repeats its overrides).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from hdcnn_stages import load_stages, stages_parser


@torch.inference_mode()
def _outputs(pre: object, loader: object) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Block logits, labels and every runnable component's local logits over ``loader``."""
    block, model = pre.block.eval(), pre.model.eval()
    logits, labels, local = [], [], {k: [] for k in model.runnable}
    for x, y in loader:
        logits.append(block(x))
        labels.append(y)
        h = model.shared(x)
        for k in model.runnable:
            local[k].append(model.fine.forward_one(model.slot(k), h)[:, : len(model.partial_sets[k])])
    return torch.cat(logits), torch.cat(labels), {k: torch.cat(v) for k, v in local.items()}


def main() -> None:
    args = stages_parser(__doc__).parse_args()
    _, bundle, loaders, pre = load_stages(args)
    print(f"command: {' '.join(sys.argv)}\n")
    print("| split | partial set S_k | images | block, argmax over S_k | fine component F_k | F_k - block |")
    print("|---|---|---:|---:|---:|---:|")
    for split, loader in (("held-out", loaders.val), ("test", loaders.test)):
        logits, labels, local = _outputs(pre, loader)
        for k, out in local.items():
            members = torch.tensor(pre.model.partial_sets[k])
            mask = torch.isin(labels, members)
            target = (labels[mask, None] == members).float().argmax(1)  # local index of the label
            block = (logits[mask][:, members].argmax(1) == target).float().mean().item()
            comp = (out[mask].argmax(1) == target).float().mean().item()
            names = ", ".join(bundle.classes[j] for j in members.tolist())
            print(
                f"| {split} | {{{names}}} | {int(mask.sum())} | {100 * block:.2f} | {100 * comp:.2f} | "
                f"{100 * (comp - block):+.2f} |"
            )


if __name__ == "__main__":
    main()
