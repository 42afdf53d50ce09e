"""The ``liptorch`` command line.

    liptorch                      train + certify the default model on the embedded digits
    liptorch train [options]      train, checkpoint every epoch, certify, write report + plot
    liptorch certify RUN_DIR      certify a trained run on its test set
    liptorch models               list the model zoo (parameters and bounds)
    liptorch bench                layer speed benchmark against nn.Conv2d

Errors (bad arguments, missing runs, corrupt checkpoints or data) print one line and
exit with status 2; set LIPTORCH_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _parse_model_args(args) -> dict:
    out: dict = {}
    for name in ("gamma", "head", "activation", "pool", "width"):
        val = getattr(args, name, None)
        if val is not None:
            out[name] = val
    if getattr(args, "fast_backward", False):
        out["fast_backward"] = True
    for item in getattr(args, "model_arg", None) or []:
        if "=" not in item:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import DEFAULT_MODEL, LOSSES, SCHEDULES

    p.add_argument("--data", default="digits", help="digits | fashion-mnist | mnist | cifar10 | cifar100 (default: digits)")
    p.add_argument("--data-dir", default=None, help="directory holding the data set files")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo model name (default: {DEFAULT_MODEL}); see `liptorch models`")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default 30)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock training budget in seconds (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--loss", choices=LOSSES, default=None)
    p.add_argument("--eps-train", type=float, default=None, help="ε setting the hinge margin √2·ε·L / CE offset 2√2·ε·L")
    p.add_argument("--margin", type=float, default=None, help="hinge margin (overrides --eps-train)")
    p.add_argument("--offset", type=float, default=None, help="offset cross-entropy offset (overrides --eps-train)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--cr", type=float, default=None, help="certificate regularisation γ: loss −= γ·mean(ReLU(cert))")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this fraction of training data for per-epoch evaluation")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--eps", dest="eval_eps", default=None, help="radii to certify at, e.g. 0.5,1.0,1.58 or 36/255")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--gamma", type=float, default=None, help="Lipschitz bound γ (Sandwich models)")
    p.add_argument("--head", default=None, help="head: global|lln (sandwich), ortho|lln|mlp (soc)")
    p.add_argument("--activation", default=None, help="maxmin | hh1 | hh2 (soc)")
    p.add_argument("--pool", default=None, help="none | max | manifold (soc)")
    p.add_argument("--width", type=int, default=None, help="base width (soc, bjorck-fc3)")
    p.add_argument("--fast-backward", action="store_true", help="SOC fast backward (approximate filter gradient)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model argument (JSON value)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_config(args):
    from .train import TrainConfig

    fields = {}
    for name in ("data", "data_dir", "model", "epochs", "budget", "batch_size", "optimizer", "lr", "momentum",
                 "weight_decay", "schedule", "loss", "eps_train", "margin", "offset", "temperature", "cr",
                 "grad_clip", "seed", "device", "val_fraction", "limit_train", "limit_test", "eval_eps", "eval_every"):
        val = getattr(args, name, None)
        if val is not None:
            fields[name] = val
    cfg = TrainConfig(**fields)
    cfg.model_args = _parse_model_args(args)
    cfg.out = args.out or str(Path("runs") / f"{cfg.model}-{cfg.data}")
    cfg.progress = not args.no_progress and sys.stderr.isatty()
    return cfg


def cmd_train(args) -> int:
    from .train import train

    cfg = _train_config(args)
    if args.resume and not (Path(cfg.out) / "checkpoint.pt").exists():
        raise ValueError(f"--resume: no checkpoint in {cfg.out}")
    print(f"liptorch: training {cfg.model} on {cfg.data} -> {cfg.out}", flush=True)
    train(cfg, resume=args.resume, log=lambda m: print(m, flush=True))
    return 0


def cmd_certify(args) -> int:
    from .certify import certified_accuracy, parse_eps
    from .checkpoint import read_checkpoint
    from .data import dataset_info, load_dataset
    from .report import format_table
    from .train import TrainConfig, build_model_from_checkpoint

    state = read_checkpoint(args.run_dir)
    cfg = TrainConfig.from_dict(state["config"])
    data = dataset_info(args.data).name if args.data else cfg.data
    if data != state["data_info"]["name"]:
        raise ValueError(f"run {args.run_dir} was trained on {state['data_info']['name']!r}, not {data!r}")
    model = build_model_from_checkpoint(state).to(args.device)
    eps = args.eps or cfg.eval_eps
    parse_eps(eps)
    splits = load_dataset(data, data_dir=args.data_dir or cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                          limit_test=cfg.limit_test if args.limit_test is None else args.limit_test)
    x, y = splits.test
    res = certified_accuracy(model, x.to(args.device), y.to(args.device), [e for e in eps.split(",") if e], exact=args.exact)
    lip = model.feature_bound() if hasattr(model.head, "certified_radius") else model.lipschitz_bound()
    out = {
        "run": str(args.run_dir), "model": state["model_name"], "data": data, "clean_accuracy": res["clean_accuracy"],
        "certified_accuracy": res["certified_accuracy"], "median_radius": res["median_radius"],
        "lipschitz_bound": lip, "n_test": res["n"], "exact_fp64": bool(args.exact),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        out.update(epochs=state["epoch"], train_seconds=float(state["scheduler_state"]["elapsed"]),
                   lipschitz_bound_str=f"{lip:.7g}")
        print(format_table(out))
    return 0


def cmd_models(args) -> int:
    from .models import create_model, list_models, model_description

    shapes = {"digits": (1, (8, 8), 10), "mnist": (1, (28, 28), 10), "cifar10": (3, (32, 32), 10)}
    c, size, k = shapes[args.data]
    kind = "guaranteed" if args.exact else "nominal"
    print(f"{'name':<20} {'params':>12} {kind + ' bound':>16}  description (built for {args.data})")
    for name in list_models():
        if name.startswith("soc-lipconvnet") and not args.all and name not in ("soc-lipconvnet-5", "soc-lipconvnet-10"):
            continue
        try:
            m = create_model(name, c, size, k)
            params = sum(p.numel() for p in m.parameters())
            star = "" if not hasattr(m.head, "certified_radius") else "*"
            if not args.exact:
                bound = f"{m.nominal_bound:.6g}{star}"
            elif star:
                bound = f"{m.feature_bound():.6g}*"
            else:
                bound = f"{m.lipschitz_bound():.6g}"
        except Exception as exc:  # a model that cannot be built for this data shape
            params, bound = 0, f"n/a ({exc})"
        print(f"{name:<20} {params:>12,} {bound:>16}  {model_description(name)}")
    if not args.all:
        print("(soc-lipconvnet-15 … 40 hidden; --all lists them)")
    if not args.exact:
        print("nominal = the bound the architecture is designed for; --exact computes the guaranteed bounds "
              "(measured from the explicit operators, slower); * = bound of the features (head has its own certificate)")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_budget_benchmark, run_layer_benchmark

    if args.budget is not None:
        if not args.budget > 0:
            raise ValueError(f"--budget must be a positive number of seconds, got {args.budget}")
        fams = args.families.split(",") if args.families else None
        print(f"budget benchmark: {args.budget:g} s per model on {args.data} ({args.device})")
        print("| family | model | params | clean | certified (" + args.data + " radii) | epochs | s/epoch | peak MB |")
        print("|---|---|---|---|---|---|---|---|")
        run_budget_benchmark(args.budget, data=args.data, out_dir=args.out, device=args.device, families=fams,
                             data_dir=args.data_dir, threads=args.threads)
        return 0

    run_layer_benchmark(batch=args.batch, channels=args.channels, size=args.size, kernel=args.kernel,
                        rounds=args.rounds, threads=args.threads, device=args.device, markdown=args.markdown,
                        repeats=args.repeats)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"liptorch: error: {message} (see {self.prog} --help)\n")


def _load_run(run_dir, device="cpu", limit_test=None, data_dir=None):
    from .checkpoint import read_checkpoint
    from .data import load_dataset
    from .train import TrainConfig, build_model_from_checkpoint

    state = read_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model_from_checkpoint(state).to(device)
    splits = load_dataset(cfg.data, data_dir=data_dir or cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                          limit_test=limit_test)
    return state, cfg, model, splits


def _capture_inputs(model, modules, x):
    """The input each of ``modules`` sees when ``model`` runs on ``x``."""
    import torch

    seen, hooks = {}, []
    for mod in modules:
        hooks.append(mod.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0].detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def cmd_verify(args) -> int:
    import math

    from .empirical import layer_lower_bound, lower_bound

    state, cfg, model, splits = _load_run(args.run_dir, args.device, limit_test=args.points, data_dir=args.data_dir)
    model.eval()
    x = splits.test[0][: args.points].to(args.device)
    report = model.layer_report()
    inputs = _capture_inputs(model, [r["module"] for r in report], x[: min(8, len(x))])
    rows = []
    for row in report:
        mod = row.pop("module")
        lower = math.nan
        if mod in inputs and any(True for _ in mod.parameters()):
            lower = layer_lower_bound(mod, inputs[mod], iters=args.iters)
        elif mod in inputs:
            lower = float("nan")
        row["lower"] = lower
        row["tightness_percent"] = 100 * lower / row["bound"] if row["bound"] and not math.isnan(lower) else math.nan
        rows.append(row)
    head_cert = hasattr(model.head, "certified_radius")
    target = model.features if head_cert else model
    upper = model.feature_bound() if head_cert else model.lipschitz_bound()
    lower = lower_bound(target, x, steps=args.steps, restarts=args.restarts)
    result = {
        "run": str(args.run_dir), "model": state["model_name"], "bracket_of": "features" if head_cert else "logits",
        "lower_bound": lower, "upper_bound": upper, "tightness_percent": 100 * lower / upper, "sound": lower <= upper,
        "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| layer | type | input size | bound (explicit operator) | empirical lower | tightness % |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            size = "x".join(map(str, r["input_size"])) if r["input_size"] else "-"
            lo = "-" if math.isnan(r["lower"]) else f"{r['lower']:.6f}"
            ti = "-" if math.isnan(r["tightness_percent"]) else f"{r['tightness_percent']:.2f}"
            print(f"| {r['name']} | {r['type']} | {size} | {r['bound']:.7f} | {lo} | {ti} |")
        print(f"\nwhole model ({result['bracket_of']}): {lower:.6f} <= L <= {upper:.7f}  (tightness {result['tightness_percent']:.2f} %)")
    if lower > upper:
        print("liptorch: error: the empirical lower bound exceeds the certified bound: the model is NOT sound", file=sys.stderr)
        return 1
    return 0


def cmd_attack(args) -> int:
    import torch

    from .attacks import attack_certificates
    from .certify import certified_radius

    state, cfg, model, splits = _load_run(args.run_dir, args.device, limit_test=args.points, data_dir=args.data_dir)
    x, y = splits.test
    x, y = x[: args.points].to(args.device), y[: args.points].to(args.device)
    pred, radius = certified_radius(model, x)
    correct = pred == y.cpu()
    res = attack_certificates(model, x, radius.to(x.dtype).to(args.device), pred=pred.to(args.device),
                              steps=args.steps, restarts=args.restarts,
                              generator=torch.Generator(device=args.device).manual_seed(0))
    attacked = res["attacked"].cpu() & correct
    ratio = res["ratio"].cpu()[attacked]
    finite = ratio[torch.isfinite(ratio)]
    out = {
        "run": str(args.run_dir), "points": int(x.shape[0]), "certified_points": int(attacked.sum()),
        "violations": int(res["violations"].cpu()[attacked].sum()),
        "ratio_min": float(finite.min()) if finite.numel() else None,
        "ratio_median": float(finite.median()) if finite.numel() else None,
        "ratio_max": float(finite.max()) if finite.numel() else None,
        "no_adversarial_found": int((~torch.isfinite(ratio)).sum()),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['certified_points']} certified test points attacked (PGD at 0.999 r + min-norm attack)")
        if finite.numel():
            print(f"smallest adversarial distance / certified radius: min {out['ratio_min']:.4f}, "
                  f"median {out['ratio_median']:.4f}, max {out['ratio_max']:.4f}")
        print(f"violations (adversarial inside a certified radius): {out['violations']}")
    return 1 if out["violations"] else 0


def cmd_toy(args) -> int:
    from .toy import run_toy

    rows = run_toy(gammas=[float(g) for g in args.gammas.split(",")], epochs=args.epochs, seed=args.seed)
    print("| gamma | model | params | test MSE | certified bound | empirical lower | tightness % | max slope |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gamma']:g} | {r['model']} | {r['parameters']:,} | {r['test_mse']:.4f} | {r['certified_bound']:.4f} "
              f"| {r['empirical_lower_bound']:.4f} | {r['tightness_percent']:.1f} | {r['max_slope']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _load_samples(spec: str, data_dir=None):
    import numpy as np
    import torch

    path = Path(spec)
    if spec.endswith(".npy"):
        if not path.is_file():
            raise ValueError(f"no such file: {spec}")
        return torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float32)
    if spec.endswith(".pt"):
        if not path.is_file():
            raise ValueError(f"no such file: {spec}")
        t = torch.load(path, weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{spec} must hold a single tensor of samples")
        return t.float()
    if ":" not in spec:
        raise ValueError(f"sample spec must be DATASET:CLASS, FILE.npy or FILE.pt, got {spec!r}")
    from .data import load_dataset

    name, cls = spec.rsplit(":", 1)
    splits = load_dataset(name, data_dir=data_dir)
    x, y = splits.train
    try:
        k = int(cls)
    except ValueError:
        raise ValueError(f"class in {spec!r} must be an integer") from None
    sel = x[y == k]
    if sel.shape[0] == 0:
        raise ValueError(f"{name} has no training samples of class {k}")
    return sel


def cmd_wasserstein(args) -> int:
    from .wasserstein import estimate

    p = _load_samples(args.p, args.data_dir)
    q = _load_samples(args.q, args.data_dir)
    if args.limit:
        p, q = p[: args.limit], q[: args.limit]
    res = estimate(p, q, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device)
    out = res.as_dict()
    out.pop("history")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"W1({args.p}, {args.q}) >= {res.estimate:.4f}  (95% CI {res.ci_low:.4f} .. {res.ci_high:.4f}; "
              f"critic bound {res.lipschitz_bound:.6f}; held-out samples)")
    return 0


def cmd_export(args) -> int:
    from .exporting import export_run

    try:
        res = export_run(args.run_dir, args.out)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        t = res.get("timing", {})
        print(f"exported to {res['path']} ({res['format']}); max relative difference {res['max_rel_diff']:.2e}")
        if t:
            print(f"inference, batch {t['batch_size']}: original {t['original_ms']:.2f} ms, exported {t['exported_ms']:.2f} ms "
                  f"(speed-up {t['speedup']:.2f}x)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liptorch", description="Lipschitz networks with sound certified robustness")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train + certify a model (the default command)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("certify", help="certify a trained run on its test set")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eps", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--exact", action="store_true", help="evaluate in float64 (rigorous up to fp64 rounding)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit-test", type=int, default=None)
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--data", default="digits", choices=("digits", "mnist", "cifar10"))
    p.add_argument("--all", action="store_true")
    p.add_argument("--exact", action="store_true", help="compute the guaranteed bounds (slow for large models)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="layer benchmark: constrained convs vs nn.Conv2d")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the interleaved benchmark this many times; report median ratios and their range")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--budget", type=float, default=None, help="instead: train each family for this many seconds")
    p.add_argument("--data", default="fashion-mnist", help="data set of the budget benchmark")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--families", default=None, help="comma list of Sandwich,BCOP,SOC,Bjorck (budget benchmark)")
    p.add_argument("--out", default="runs/budget", help="run directory of the budget benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("verify", help="per-layer bounds vs empirical lower bounds of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--points", type=int, default=64)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("attack", help="attack every certified test point; report distance / radius")
    p.add_argument("run_dir")
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("export", help="export a trained run to plain PyTorch (.pt, TorchScript) or ONNX (.onnx)")
    p.add_argument("run_dir")
    p.add_argument("out", help="OUT.pt or OUT.onnx")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("toy", help="square-wave tightness experiment of the Sandwich paper")
    p.add_argument("--gammas", default="1,5,10")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_toy)

    p = sub.add_parser("wasserstein", help="estimate W1 between two sample sets with a 1-Lipschitz critic")
    p.add_argument("--p", required=True, help="DATASET:CLASS, FILE.npy or FILE.pt")
    p.add_argument("--q", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wasserstein)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv  # `liptorch [train options]` is `liptorch train ...`
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .runtime import tune_from_environment

        tune_from_environment()  # glibc: keep freed tensors' memory (LIPTORCH_CPU_ALLOCATOR=default opts out)
        return args.func(args)
    except KeyboardInterrupt:
        print("liptorch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback
        if os.environ.get("LIPTORCH_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"liptorch: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
