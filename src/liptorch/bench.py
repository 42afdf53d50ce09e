"""Layer benchmark: each constrained convolution against ``nn.Conv2d`` of the same shape.

A *training step* is zero-grad + forward + backward of a mean-square loss in training mode
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

from .nn.base import check_positive_int
from .runtime import cpu_allocator_state

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
        "SOCConv2d(circular)": lambda: SOCConv2d(c, c, k, padding_mode="circular"),
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
            x.grad = None
            layer(x).square().mean().backward()
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


def _ratio_text(ratios: list[float]) -> str:
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{med:.2f}x"
    return f"{med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def run_layer_benchmark(batch=64, channels=64, size=16, kernel=3, rounds=15, threads=2, device="cpu", markdown=False,
                        print_fn=print, repeats: int = 1) -> dict:
    """Time every layer of :func:`layer_factories` against ``nn.Conv2d`` of the same shape.

    ``repeats`` runs of :func:`time_layers` (each ``rounds`` interleaved rounds) give, per
    layer, the median time and the median and range of the per-run ratios (``train_ratios``
    / ``eval_ratios``): on a shared or throttled machine one run's ratio can move by ±10 %.
    """
    for name, value in (("batch", batch), ("channels", channels), ("size", size), ("kernel", kernel),
                        ("rounds", rounds), ("repeats", repeats)):
        check_positive_int(name, value)
    if threads:
        torch.set_num_threads(check_positive_int("threads", threads))
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    layers = {n: f().to(device) for n, f in layer_factories(channels, size, kernel).items()}
    # The input requires grad, as for any layer inside a network: every layer (the plain
    # conv included) computes its input gradient in the training step.
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    runs = [time_layers(layers, x, rounds) for _ in range(repeats)]
    res = {}
    for name in layers:
        res[name] = {
            key: statistics.median(run[name][key] for run in runs) for key in ("train", "eval")
        }
        for key in ("train", "eval"):
            res[name][f"{key}_ratios"] = [run[name][key] / run["nn.Conv2d"][key] for run in runs]
            res[name][f"{key}_ratio"] = statistics.median(res[name][f"{key}_ratios"])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    alloc = f", CPU allocator {cpu_allocator_state()}" if device.type == "cpu" else ""
    runs_text = f" x {repeats} runs (median, range)" if repeats > 1 else ""
    print_fn(f"batch {batch}, {channels}->{channels} channels, {size}x{size}, kernel {kernel}, {rounds} rounds{runs_text}, "
             f"{dev_name}, torch {torch.__version__}{alloc}")
    width = 20 if repeats > 1 else 7  # ratio column of the plain-text table
    if markdown:
        print_fn("| layer | train step (ms) | train ratio | eval forward (ms) | eval ratio |")
        print_fn("|---|---|---|---|---|")
    else:
        print_fn(f"{'layer':<26} {'train ms':>10} {'ratio':>{width}} {'eval ms':>10} {'ratio':>{width}}")
    for name, t in res.items():
        tr, ev = _ratio_text(t["train_ratios"]), _ratio_text(t["eval_ratios"])
        if markdown:
            print_fn(f"| {name} | {1e3 * t['train']:.2f} | {tr} | {1e3 * t['eval']:.2f} | {ev} |")
        else:
            print_fn(f"{name:<26} {1e3 * t['train']:>10.2f} {tr:>{width}} {1e3 * t['eval']:>10.2f} {ev:>{width}}")
    return res


BUDGET_MODELS = {
    # family: (zoo model, model args, recipe).  Comparable sizes: 1.1M-2.9M parameters,
    # all with inputs in [0, 1] and no input scaling (L of the whole model is the layers' bound).
    "Sandwich": ("sandwich-kwl-s", {}, {"loss": "offset-ce", "eps_train": 1.0, "lr": 0.005}),
    "BCOP": ("bcop-large", {}, {"loss": "offset-ce", "eps_train": 1.0, "lr": 0.001}),
    "SOC": ("soc-lipconvnet-5", {"width": 8, "std": 1.0}, {"loss": "offset-ce", "eps_train": 1.0, "lr": 0.001}),
    "Bjorck": ("bjorck-fc3", {}, {"loss": "offset-ce", "eps_train": 1.0, "lr": 0.001}),
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux: process-wide peak


def _budget_one(family: str, budget: float, data: str, out_dir: str, device: str, data_dir, batch_size: int,
                threads: int | None, splits=None, allocator: str = "default") -> dict:
    """Train one family and return its row.  Runs in a fresh process on CPU so that the
    process-wide peak RSS belongs to this model alone (which then loads the data itself;
    in-process callers pass the loaded ``splits``); ``allocator`` is the parent's
    :func:`~liptorch.runtime.cpu_allocator_state`, repeated in the child."""
    from pathlib import Path

    from .data import load_dataset
    from .runtime import tune_cpu_allocator
    from .train import TrainConfig, train

    if allocator == "tuned":
        tune_cpu_allocator()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model, margs, recipe = BUDGET_MODELS[family]
    if splits is None:
        splits = load_dataset(data, data_dir=data_dir)
    cfg = TrainConfig(data=data, model=model, model_args=dict(margs), budget=budget, batch_size=batch_size,
                      device=device, out=str(Path(out_dir) / family.lower()), progress=False, eval_every=0, **recipe)
    report = train(cfg, log=lambda m: None, splits=splits)
    per_epoch = report["train_seconds"] / max(report["epochs_completed"], 1e-9)
    return {"family": family, "model": model, "model_args": margs,
            **{k: report[k] for k in ("clean_accuracy", "certified_accuracy", "epochs_completed", "train_seconds", "parameters")},
            "seconds_per_epoch": per_epoch, "peak_memory_mb": _peak_memory_mb(dev),
            "lipschitz_bound": report["lipschitz_bound"], "threads": torch.get_num_threads()}


def run_budget_benchmark(budget: float, data: str = "fashion-mnist", out_dir: str = "runs/budget", device: str = "cpu",
                         families=None, data_dir=None, batch_size: int = 256, print_fn=print, threads: int | None = None,
                         isolate: bool = True) -> list[dict]:
    """Train each layer family in a comparable architecture for the same wall-clock budget
    ("1-Lipschitz Layers Compared" method) and tabulate clean / certified accuracy, epochs,
    seconds per epoch and peak memory (CUDA: peak allocated; CPU: peak RSS of a fresh
    process per family when ``isolate``)."""
    import concurrent.futures as cf
    import json
    import multiprocessing as mp
    from pathlib import Path

    families = list(families or BUDGET_MODELS)
    for family in families:
        if family not in BUDGET_MODELS:
            raise ValueError(f"unknown family {family!r}; choose from {', '.join(BUDGET_MODELS)}")
    splits = None
    if not isolate:
        from .data import load_dataset

        splits = load_dataset(data, data_dir=data_dir)
    rows = []
    for family in families:
        args = (family, budget, data, out_dir, device, data_dir, batch_size, threads)
        if isolate:
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                row = pool.submit(_budget_one, *args, allocator=cpu_allocator_state()).result()
        else:
            row = _budget_one(*args, splits=splits)
        rows.append(row)
        cert = " / ".join(f"{100 * v:.1f}" for v in row["certified_accuracy"].values())
        print_fn(f"| {family} | {row['model']} | {row['parameters']:,} | {100 * row['clean_accuracy']:.1f} | {cert} | "
                 f"{row['epochs_completed']:.2f} | {row['seconds_per_epoch']:.1f} | {row['peak_memory_mb']:.0f} |")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "budget.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows
