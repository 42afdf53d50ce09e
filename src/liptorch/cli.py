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
    print(f"{'name':<20} {'params':>12} {'bound':>10}  description (built for {args.data})")
    for name in list_models():
        if name.startswith("soc-lipconvnet") and not args.all and name not in ("soc-lipconvnet-5", "soc-lipconvnet-10"):
            continue
        try:
            m = create_model(name, c, size, k)
            params = sum(p.numel() for p in m.parameters())
            try:
                bound = f"{m.lipschitz_bound():.6g}"
            except ValueError:
                bound = f"{m.feature_bound():.6g}*"
        except Exception as exc:  # a model that cannot be built for this data shape
            params, bound = 0, f"n/a ({exc})"
        print(f"{name:<20} {params:>12,} {bound:>10}  {model_description(name)}")
    if not args.all:
        print("(soc-lipconvnet-15 … 40 hidden; --all lists them)")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_layer_benchmark

    run_layer_benchmark(batch=args.batch, channels=args.channels, size=args.size, kernel=args.kernel,
                        rounds=args.rounds, threads=args.threads, device=args.device, markdown=args.markdown)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"liptorch: error: {message} (see {self.prog} --help)\n")


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
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="layer benchmark: constrained convs vs nn.Conv2d")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    p.set_defaults(func=cmd_bench)
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
