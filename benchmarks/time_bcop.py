"""Timing of BCOPConv2d against a plain nn.Conv2d of the same shape (not a test).

Interleaves the candidates round by round and reports medians and the median of the
per-round ratios (the machine is shared, so re-run a few times).

    python benchmarks/time_bcop.py [--rounds 30] [--drift 0] [--channels 64] [--size 16]

``--drift S`` first takes S Adam steps (lr 1e-3) on a random loss so the free matrices
move away from their orthogonal initialisation (Björck then needs more iterations).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from liptorch.nn.bcop import BCOPConv2d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--drift", type=int, default=0)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-early-stop", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, n, k = args.channels, args.size, args.kernel
    x = torch.randn(args.batch, c, n, n)
    g = torch.randn(args.batch, c, n, n)
    plain = torch.nn.Conv2d(c, c, k, padding=k // 2)
    bcop = BCOPConv2d(c, c, k, bjorck_iters=args.iters, bjorck_early_stop=not args.no_early_stop)
    if args.drift:
        opt = torch.optim.Adam(bcop.parameters(), lr=1e-3)
        xs = torch.randn(8, c, n, n)
        for _ in range(args.drift):
            opt.zero_grad()
            (bcop(xs) * torch.randn_like(xs)).sum().backward()
            opt.step()
    # how many Björck steps the current matrices need
    from liptorch.ops.orthogonalize import bjorck_orthonormalize
    steps = []
    import liptorch.ops.orthogonalize as orth

    def count_steps():
        calls = []
        orig = torch.baddbmm

        def wrapped(*a, **kw):
            calls.append(1)
            return orig(*a, **kw)

        orth.torch.baddbmm = wrapped
        try:
            with torch.no_grad():
                bjorck_orthonormalize(bcop.matrices, iters=args.iters, early_stop=not args.no_early_stop)
        finally:
            orth.torch.baddbmm = orig
        return len(calls)

    print(f"Björck steps taken: {count_steps()} of at most {args.iters}")

    def train(m):
        def f():
            for p in m.parameters():
                p.grad = None
            m(x).backward(g)
        return f

    def evaluate(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def run(fs, label):
        times = {key: [] for key in fs}
        for f in fs.values():
            f()
        for _ in range(args.rounds):
            for key, f in fs.items():
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
        ref = times["plain"]
        for key, v in times.items():
            ratios = [a / b for a, b in zip(v, ref)]
            p10 = sorted(v)[len(v) // 10]
            p10_ref = sorted(ref)[len(ref) // 10]
            print(f"{label:5s} {key:6s} median {1e3 * statistics.median(v):7.3f} ms  p10 {1e3 * p10:7.3f} ms  "
                  f"min {1e3 * min(v):7.3f} ms | ratio: median-of-rounds {statistics.median(ratios):.3f}  "
                  f"p10/p10 {p10 / p10_ref:.3f}  min/min {min(v) / min(ref):.3f}")

    plain.train(); bcop.train()
    run({"plain": train(plain), "bcop": train(bcop)}, "train")
    plain.eval(); bcop.eval()
    run({"plain": evaluate(plain), "bcop": evaluate(bcop)}, "eval")


if __name__ == "__main__":
    main()
