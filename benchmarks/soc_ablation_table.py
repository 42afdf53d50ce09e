"""Print the markdown table of a finished ``soc_ablation.sh`` run directory."""
import json
import sys
from pathlib import Path

LABELS = {
    "baseline": "baseline (orthogonal 1x1 SOC head, MaxMin)",
    "lln": "+ LLN (`--head lln`)",
    "cr": "+ CR 0.5 (`--cr 0.5`)",
    "hh1": "+ HH1 (`--activation hh1`)",
    "mlp-head": "+ MLP head (`--head mlp`, dual certificate)",
    "manifold-pool": "+ ManifoldPool (`--pool manifold`, NeurIPS-2022 layout)",
    "max-pool": "control: max pool, same layout (`--pool max`)",
    "fast-backward": "+ fast backward (`--fast-backward`)",
    "circular": "circular padding (`--model-arg padding_mode=circular`; not the papers' layer)",
}


def main(out: str) -> None:
    print("| variant | clean | ε = 0.5 | ε = 1.0 | ε = 1.58 | epochs in budget | s / epoch | L | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label in LABELS.items():
        path = Path(out) / name / "report.json"
        if not path.exists():
            print(f"| {label} | (not run) | | | | | | | |")
            continue
        r = json.loads(path.read_text())
        cert = " | ".join(f"{100 * v:.2f}" for v in r["certified_accuracy"].values())
        ep = r.get("epochs_completed", r["epochs"])
        print(f"| {label} | {100 * r['clean_accuracy']:.2f} | {cert} | {ep:.2f} | {r['train_seconds'] / ep:.0f} | "
              f"{r['lipschitz_bound_str']} ({r['lipschitz_bound_of']}) | {r['parameters']:,} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/soc-ablation")
