"""Timing script for SOCConv2d (not a test; run ``python tests/bench_soc.py``).

Times a training step (forward + backward of a mean-square loss, parameter transform
included, input requiring grad unless --no-input-grad) and a cached eval forward of
``SOCConv2d(64, 64, 3)`` against ``nn.Conv2d(64, 64, 3, padding=1)`` on a batch of
64 × 64 × 16 × 16, with 2 threads.  Configurations are interleaved round by round and
the medians are compared, because other processes share the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from liptorch.nn.soc import SOCConv2d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--no-input-grad", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, n, b = args.channels, args.size, args.batch
    x0 = torch.randn(b, c, n, n)
    plain = nn.Conv2d(c, c, 3, padding=1)
    socs = {
        "soc_default": SOCConv2d(c, c, 3),  # exact gradient, plain autograd
        "soc_custom": SOCConv2d(c, c, 3),  # exact gradient, custom Function
        "soc_fast": SOCConv2d(c, c, 3, fast_backward=True),
    }
    socs["soc_custom"].custom_backward = True

    def train_step(layer):
        def run():
            x = x0.detach().requires_grad_(not args.no_input_grad)
            layer.zero_grad(set_to_none=True)
            loss = layer(x).square().mean()
            loss.backward()
        return run

    def eval_step(layer):
        def run():
            with torch.no_grad():
                layer(x0)
        return run

    cases = {"plain_train": train_step(plain)}
    for name, layer in socs.items():
        layer.train()
        cases[name + "_train"] = train_step(layer)
    plain_eval = nn.Conv2d(c, c, 3, padding=1).eval()
    soc_eval = SOCConv2d(c, c, 3).eval()
    cases["plain_eval"] = eval_step(plain_eval)
    cases["soc_eval"] = eval_step(soc_eval)

    for fn in cases.values():  # warm-up (also fills the eval cache)
        fn()
        fn()
    # Each SOC case is timed right after a plain-conv run of the same kind, so every
    # round gives a paired ratio that is robust to other processes' load.
    pairs = {name: ("plain_eval" if name.endswith("_eval") else "plain_train") for name in cases if not name.startswith("plain")}
    times: dict[str, list[float]] = {k: [] for k in cases}
    ratios: dict[str, list[float]] = {k: [] for k in pairs}

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(args.rounds):
        for name, base in pairs.items():
            tb = timed(cases[base])
            tc = timed(cases[name])
            times[base].append(tb)
            times[name].append(tc)
            ratios[name].append(tc / tb)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    print(f"threads={args.threads} batch={b} channels={c} size={n} input_grad={not args.no_input_grad} rounds={args.rounds}")
    for name in cases:
        line = f"{name:18s} median {med[name]:8.2f} ms   min {low[name]:8.2f} ms"
        if name in ratios:
            base = pairs[name]
            line += (f"   paired-ratio median {statistics.median(ratios[name]):5.2f}x"
                     f"   ratio of medians {med[name] / med[base]:5.2f}x   ratio of mins {low[name] / low[base]:5.2f}x")
        print(line)
    print(f"fast-backward train-step speed-up over the exact default: "
          f"{med['soc_default_train'] / med['soc_fast_train']:.2f}x (ratio of medians), "
          f"over the custom exact: {med['soc_custom_train'] / med['soc_fast_train']:.2f}x")


if __name__ == "__main__":
    main()
