"""GPU training throughput of the building blocks: fp32 vs bf16 autocast, NCHW vs channels_last.

    python benchmarks/gpu_throughput.py [--models vgg_small_bn vgg16_bn] [--iters 30]

One SGD step (forward, cross-entropy, backward, update) on random data already on the GPU; images/s
is the median over ``--iters`` steps after warm-up, timed with CUDA events. Prints a markdown table
with each setting's speed-up over fp32 NCHW measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from coarse2fine.models import create_model

SETTINGS = {  # name -> (autocast dtype or None, channels_last)
    "fp32 NCHW": (None, False),
    "fp32 channels_last": (None, True),
    "bf16 NCHW": (torch.bfloat16, False),
    "bf16 channels_last": (torch.bfloat16, True),
}
DEFAULTS = {  # name -> (channels, size, batch)
    "vgg_small_bn": (1, 28, 512),
    "vgg16_small_bn": (3, 32, 256),
    "vgg16_bn": (3, 224, 64),
    "vgg16": (3, 224, 64),
}


def step_rate(name: str, chans: int, size: int, batch: int, dtype: torch.dtype | None, cl: bool, iters: int) -> float:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100, in_chans=chans, input_size=size).cuda()
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, chans, size, size, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (batch,), device="cuda")
    times = []
    for i in range(iters + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1000)
    return batch / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULTS))
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| model | input | batch | setting | train images/s | vs fp32 NCHW |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        chans, size, batch = DEFAULTS.get(name, (3, 224, 64))
        base = None
        for setting, (dtype, cl) in SETTINGS.items():
            rate = step_rate(name, chans, size, batch, dtype, cl, args.iters)
            base = base or rate
            print(f"| {name} | {chans}x{size}x{size} | {batch} | {setting} | {rate:,.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
