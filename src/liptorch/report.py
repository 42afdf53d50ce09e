"""Final evaluation of a trained model: certified-accuracy table, report.json,
report.md and a plot of certified accuracy against radius."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from .certify import certified_accuracy, parse_eps

__all__ = ["write_report", "format_table", "plot_certified_curve", "certified_curve"]


def certified_curve(pred: torch.Tensor, radius: torch.Tensor, y: torch.Tensor, points: int = 200):
    """(radii, accuracy) pairs: fraction of points correct with radius > r, on a grid of r."""
    correct = pred == y
    r_max = float(radius[correct].max()) if correct.any() else 1.0
    r_max = max(r_max, 1e-3) * 1.05
    grid = torch.linspace(0, r_max, points, dtype=torch.float64)
    acc = [(correct & (radius > r)).double().mean().item() for r in grid]
    return grid.tolist(), acc


def plot_certified_curve(curves: dict, path: Path, title: str, marks: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (grid, acc) in curves.items():
        ax.plot(grid, [100 * a for a in acc], label=label)
    for eps, acc in (marks or {}).items():
        ax.plot([eps], [100 * acc], "o", color="black", ms=4)
        ax.annotate(f"{100 * acc:.1f}%", (eps, 100 * acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ℓ2 radius ε (pixel units, [0, 1] scale)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(report: dict) -> str:
    cert = report["certified_accuracy"]
    head = "| model | data | clean | " + " | ".join(f"ε={k}" for k in cert) + " | L | epochs | train s |"
    sep = "|" + "---|" * (head.count("|") - 1)
    row = (
        f"| {report['model']} | {report['data']} | {100 * report['clean_accuracy']:.2f} | "
        + " | ".join(f"{100 * v:.2f}" for v in cert.values())
        + f" | {report['lipschitz_bound_str']} | {report['epochs']} | {report['train_seconds']:.0f} |"
    )
    return "\n".join([head, sep, row])


def write_report(model, cfg, splits, data_info, out: Path, epochs: int, train_seconds: float, device, log: Callable = print,
                 epochs_completed: float | None = None) -> dict:
    x_test, y_test = splits.test
    eps_labels = [e for e in cfg.eval_eps.split(",") if e]
    res = certified_accuracy(model, x_test.to(device), y_test.to(device), eps_labels)
    head_rule = "pairwise (head certificate)" if hasattr(model, "head") and hasattr(model.head, "certified_radius") else "global margin/(sqrt2 L)"
    if hasattr(model, "feature_bound") and hasattr(model.head, "certified_radius"):
        lip = model.feature_bound()
        lip_kind = "features"
    else:
        lip = model.lipschitz_bound() if hasattr(model, "lipschitz_bound") else float("nan")
        lip_kind = "logits"
    layers = []
    if hasattr(model, "layer_report"):
        for row in model.layer_report():
            layers.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items() if k != "module"})
    report = {
        "model": cfg.model,
        "model_args": cfg.model_args,
        "data": cfg.data,
        "clean_accuracy": res["clean_accuracy"],
        "certified_accuracy": res["certified_accuracy"],
        "median_radius": res["median_radius"],
        "lipschitz_bound": lip,
        "lipschitz_bound_of": lip_kind,
        "lipschitz_bound_str": f"{math.nextafter(lip, math.inf):.9g}" if math.isfinite(lip) else "n/a",
        "certificate_rule": head_rule,
        "n_test": res["n"],
        "epochs": epochs,
        # optimizer steps / steps per epoch: fractional when a budget stopped an epoch early
        "epochs_completed": float(epochs if epochs_completed is None else epochs_completed),
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "selection": "last epoch",
        "layers": layers,
        "config": cfg.to_dict(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    grid, acc = certified_curve(res["pred"], res["radius"], y_test.cpu())
    marks = dict(zip(parse_eps(eps_labels), res["certified_accuracy"].values()))
    plot_certified_curve({cfg.model: (grid, acc)}, out / "certified_accuracy.png", f"{cfg.model} on {cfg.data}", marks)
    table = format_table(report)
    md = [
        f"# {cfg.model} on {cfg.data}",
        "",
        table,
        "",
        f"- certificate: {head_rule}; L ({lip_kind}) = {report['lipschitz_bound_str']} (guaranteed, fp64, rounded up)",
        f"- test points: {res['n']}; median certified radius of correct points: {res['median_radius']:.4f}",
        f"- model selection: last epoch; parameters: {report['parameters']:,}",
        "",
        "![certified accuracy](certified_accuracy.png)",
        "",
    ]
    if layers:
        md += ["| layer | type | input size | bound |", "|---|---|---|---|"]
        md += [f"| {r['name']} | {r['type']} | {r['input_size']} | {r['bound']:.7g} |" for r in layers]
    (out / "report.md").write_text("\n".join(md) + "\n")
    log("")
    log(table)
    log(f"\nwrote {out / 'report.json'}, {out / 'report.md'}, {out / 'certified_accuracy.png'}, {out / 'checkpoint.pt'}")
    return report
