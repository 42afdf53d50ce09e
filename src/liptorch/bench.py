"""Layer benchmark: each constrained convolution against ``nn.Conv2d`` of the same shape.

A *training step* is zero-grad + forward + backward of a sum loss in training mode
(so the parameter transform — Björck, Cayley, skew + rescaling — is included); an
*eval forward* is a no-grad forward in eval mode with the cached operator.  Layers are
interleaved round by round (every layer is timed once per round, in turn) so drifts in
machine load hit all of them alike; we report median times and their ratios to the
plain convolution measured in the same run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

__all__ = ["layer_factories", "run_layer_benchmark", "time_layers"]


def layer_factories(channels: int, size: int, kernel: int) -> dict[str, Callable[[], nn.Module]]:
    from .nn.bcop import BCOPConv2d
    from .nn.sandwich import SandwichConv2d
    from .nn.soc import SOCConv2d

    c, k = channels, kernel
    return {
        "nn.Conv2d": lambda: nn.Conv2d(c, c, k, padding=k // 2),
        "BCOPConv2d": lambda: BCOPConv2d(c, c, k),
        "SOCConv2d": lambda: SOCConv2d(c, c, k),
        "SOCConv2d(fast_backward)": lambda: SOCConv2d(c, c, k, fast_backward=True),
        "SandwichConv2d": lambda: SandwichConv2d(c, c, k, size),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(layers: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Median seconds of a training step and of an eval forward per layer, interleaved."""
    device = x.device
    train_t = {n: [] for n in layers}
    eval_t = {n: [] for n in layers}
    for r in range(warmup + rounds):
        for name, layer in layers.items():
            layer.train()
            _sync(device)
            t0 = time.perf_counter()
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
            _sync(device)
            t1 = time.perf_counter()
            layer.eval()
            with torch.no_grad():
                layer(x)  # builds the cache once after the parameters changed
                _sync(device)
                t2 = time.perf_counter()
                layer(x)
                _sync(device)
                t3 = time.perf_counter()
            if r >= warmup:
                train_t[name].append(t1 - t0)
                eval_t[name].append(t3 - t2)
    return {
        n: {"train": statistics.median(train_t[n]), "eval": statistics.median(eval_t[n])} for n in layers
    }


def run_layer_benchmark(batch=64, channels=64, size=16, kernel=3, rounds=15, threads=2, device="cpu", markdown=False,
                        print_fn=print) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    layers = {n: f().to(device) for n, f in layer_factories(channels, size, kernel).items()}
    x = torch.randn(batch, channels, size, size, device=device)
    res = time_layers(layers, x, rounds)
    base = res["nn.Conv2d"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_fn(f"batch {batch}, {channels}->{channels} channels, {size}x{size}, kernel {kernel}, {rounds} rounds, {dev_name}, torch {torch.__version__}")
    if markdown:
        print_fn("| layer | train step (ms) | train ratio | eval forward (ms) | eval ratio |")
        print_fn("|---|---|---|---|---|")
    else:
        print_fn(f"{'layer':<26} {'train ms':>10} {'ratio':>7} {'eval ms':>10} {'ratio':>7}")
    for name, t in res.items():
        tr, ev = t["train"] / base["train"], t["eval"] / base["eval"]
        t["train_ratio"], t["eval_ratio"] = tr, ev
        if markdown:
            print_fn(f"| {name} | {1e3 * t['train']:.2f} | {tr:.2f}x | {1e3 * t['eval']:.2f} | {ev:.2f}x |")
        else:
            print_fn(f"{name:<26} {1e3 * t['train']:>10.2f} {tr:>6.2f}x {1e3 * t['eval']:>10.2f} {ev:>6.2f}x")
    return res
