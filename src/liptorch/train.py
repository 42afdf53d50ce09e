"""Training engine: config, optimiser and schedule, the epoch loop with atomic
checkpoints, resume, a wall-clock budget, and the final certification report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .certify import STANDARD_EPS, certified_accuracy, parse_eps
from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .losses import certificate_regularizer, global_certificate, hinge_loss, offset_cross_entropy
from .models import create_model

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "train",
    "build_model_from_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "bcop-small"
DEFAULT_EPS = {
    "digits": "0.1,0.25,0.5,1.0",
    "mnist": "0.5,1.0,1.58",
    "fashion-mnist": "0.5,1.0,1.58",
    "cifar10": "36/255,72/255,108/255",
    "cifar100": "36/255,72/255,108/255",
}
SCHEDULES = ("constant", "multistep", "exponential", "triangular", "onecycle", "cosine")
LOSSES = ("hinge", "offset-ce", "ce")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    data: str = "digits"
    model: str = DEFAULT_MODEL
    model_args: dict = field(default_factory=dict)
    out: str = "runs/default"
    data_dir: str | None = None
    epochs: int = 30
    budget: float | None = None  # seconds of training; overrides epochs when set
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "triangular"
    loss: str = "hinge"
    eps_train: float = 1.0  # ε used to set the hinge margin / CE offset
    margin: float | None = None  # hinge margin override
    offset: float | None = None  # offset-CE offset override
    temperature: float = 0.25
    cr: float = 0.0  # certificate regularisation γ
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.0
    limit_train: int | None = None
    limit_test: int | None = None
    eval_eps: str | None = None  # default by data set (DEFAULT_EPS)
    eval_every: int = 1
    progress: bool = True

    def validate(self) -> "TrainConfig":
        if self.epochs < 1 and self.budget is None:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"--budget must be a positive number of seconds, got {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.weight_decay < 0 or self.cr < 0 or self.eps_train < 0:
            raise ValueError("--weight-decay, --cr and --eps-train must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_eps is None:
            self.eval_eps = DEFAULT_EPS.get(self.data, ",".join(STANDARD_EPS))
        parse_eps(self.eval_eps)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- schedules
def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at training progress p ∈ [0, 1] (fraction of steps or of the budget)."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":  # SOC: ×0.1 at 50 % and 75 %
        return 1.0 if p < 0.5 else (0.1 if p < 0.75 else 0.01)
    if schedule == "exponential":  # BCOP: ×0.1 every 60 of 200 epochs ≈ 0.1^(p·200/60)
        return 0.1 ** (p * 200.0 / 60.0)
    if schedule == "triangular":  # LBDN piecewise linear (0,0),(.4,1),(.8,.05),(1,0)
        if p < 0.4:
            return max(p / 0.4, 0.02)
        if p < 0.8:
            return 1.0 + (p - 0.4) / 0.4 * (0.05 - 1.0)
        return 0.05 * (1.0 - p) / 0.2 + 1e-4
    if schedule == "onecycle":  # PyTorch OneCycleLR defaults: 30 % cosine warm-up from lr/25, cosine down to lr/2.5e5
        lo, hi, end = 1 / 25.0, 1.0, 1 / 25.0 / 1e4
        if p < 0.3:
            return hi + (lo - hi) * (1 + math.cos(math.pi * p / 0.3)) / 2
        return end + (hi - end) * (1 + math.cos(math.pi * (p - 0.3) / 0.7)) / 2
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {schedule!r}")


# ----------------------------------------------------------------------------- helpers
def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: never on biases, Householder/LipPool angles or the MLP head."""
    decay, no_decay = [], []
    skip_modules = {id(m) for m in model.modules() if getattr(m, "no_weight_decay", False)}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(mod) in skip_modules or p.dim() <= 1 or "theta" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)


def _data_info_dict(info) -> dict:
    return {
        "name": info.name,
        "channels": int(info.channels),
        "image_size": [int(s) for s in info.image_size],
        "num_classes": int(info.num_classes),
        "mean": [float(m) for m in (info.mean or [0.0] * info.channels)],
    }


def _build_model(model_name: str, model_args: dict, data_info: dict) -> nn.Module:
    args = dict(model_args)
    args.setdefault("mean", data_info.get("mean"))
    return create_model(model_name, data_info["channels"], tuple(data_info["image_size"]), data_info["num_classes"], **args)


def build_model_from_checkpoint(state: dict) -> nn.Module:
    model = _build_model(state["model_name"], state["model_kwargs"], state["data_info"])
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit model {state['model_name']!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_checkpoint(path_or_run_dir) -> nn.Module:
    """Rebuild the model of a run (or a checkpoint file) in eval mode, ready to certify."""
    return build_model_from_checkpoint(read_checkpoint(path_or_run_dir))


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            except Exception:  # pragma: no cover - tqdm missing
                self.bar = None

    def update(self, **postfix):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- distributed
def _dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _init_distributed(device: torch.device) -> tuple[int, int]:
    import torch.distributed as dist

    rank, world = _dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world


class _FeaturesAndLogits(nn.Module):
    """Forward returning (features, logits), so DDP sees one forward per step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        if hasattr(m, "features") and hasattr(m, "head"):
            h = m.features(x)
            return h, m.head(h)
        return None, m(x)


# ----------------------------------------------------------------------------- the loop
def _loss_fn(cfg: TrainConfig, model: nn.Module, lip: float, forward: nn.Module) -> Callable:
    margin = cfg.margin if cfg.margin is not None else math.sqrt(2.0) * cfg.eps_train * lip
    offset = cfg.offset if cfg.offset is not None else 2.0 * math.sqrt(2.0) * cfg.eps_train * lip
    head_cert = hasattr(model, "head") and hasattr(model.head, "certificate") and hasattr(model, "feature_bound")
    lip_f = model.feature_bound() if head_cert else None

    def compute(xb, yb):
        h, logits = forward(xb)
        if cfg.loss == "hinge":
            loss = hinge_loss(logits, yb, margin)
        elif cfg.loss == "offset-ce":
            loss = offset_cross_entropy(logits, yb, offset, cfg.temperature)
        else:
            loss = nn.functional.cross_entropy(logits, yb)
        if cfg.cr > 0:
            cert = model.head.certificate(h, yb, lip_f) if head_cert else global_certificate(logits, yb, lip)
            loss = loss + certificate_regularizer(cert, cfg.cr)
        if hasattr(model, "head") and hasattr(model.head, "curvature_penalty") and cfg.model_args.get("curvature", 0):
            loss = loss + float(cfg.model_args["curvature"]) * model.head.curvature_penalty()
        return loss, logits

    return compute


def _model_lipschitz(model: nn.Module) -> float:
    try:
        if hasattr(model, "feature_bound"):
            if hasattr(model.head, "certified_radius"):
                return model.feature_bound()
            return model.lipschitz_bound()
        from .nn.bounds import lipschitz_bound

        return lipschitz_bound(model)
    except ValueError:
        return 1.0


def _budget_spent(seconds: float, budget: float, world: int, device=None) -> bool:
    """All ranks stop on the same step: rank 0's clock decides."""
    spent = seconds >= budget
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if spent else 0.0], device=device)
        dist.broadcast(flag, src=0)
        spent = bool(flag.item())
    return spent


def _all_reduce_sums(device, *values: float):
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, device) -> tuple[float, float]:
    res = certified_accuracy(model, x.to(device), y.to(device), [eps], tau=None)
    return res["clean_accuracy"], next(iter(res["certified_accuracy"].values()))


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print, splits=None) -> dict:
    """Train, checkpoint every epoch, certify on the test set and write the report files.

    Returns the report dict (also written to ``out/report.json``)."""
    from .data import BatchIterator, load_dataset

    cfg.validate()
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    rank, world = _init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    main_rank = rank == 0
    if not main_rank:
        log = lambda *_a, **_k: None  # noqa: E731  (only rank 0 talks and writes)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume:
        state = read_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        # The saved run's settings win, except where to write and how to display.
        saved.out, saved.progress, saved.device = cfg.out, cfg.progress, cfg.device
        cfg = saved.validate()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)

    if splits is None:
        splits = load_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                              limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    data_info = _data_info_dict(splits.info)
    x_train, y_train = splits.train
    augment = splits.info.augment
    batches = BatchIterator(x_train, y_train, cfg.batch_size, shuffle=True, augment=augment, seed=cfg.seed,
                            rank=rank, world_size=world)
    eval_x, eval_y = splits.val if splits.val is not None else splits.test
    eval_name = "val" if splits.val is not None else "test"

    _set_seed(cfg.seed)
    model = _build_model(cfg.model, cfg.model_args, data_info).to(device)
    forward: nn.Module = _FeaturesAndLogits(model)
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _make_optimizer(model, cfg)
    start_epoch, step, elapsed = 0, 0, 0.0
    metrics_path = out / "metrics.jsonl"
    if state is not None:
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        start_epoch = int(state["epoch"])
        step = int(state["scheduler_state"]["step"])
        elapsed = float(state["scheduler_state"]["elapsed"])
        lip0 = float(state["scheduler_state"]["lip0"])
        _set_rng_state(state["rng"])
        # Drop metric lines of epochs after the checkpoint (a killed run may have logged more).
        if main_rank and metrics_path.exists():
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= start_epoch]
            metrics_path.write_text("".join(k + "\n" for k in kept))
        log(f"resumed {ckpt_path} at epoch {start_epoch}")
    elif main_rank and metrics_path.exists():
        metrics_path.unlink()

    steps_per_epoch = len(batches)
    total_steps = cfg.epochs * steps_per_epoch
    eval_eps = parse_eps(cfg.eval_eps)[0]
    if state is None:
        # The bound that sets the loss margin is fixed at the start (and checkpointed), so
        # a resumed run optimises exactly the same objective.
        lip0 = _model_lipschitz(model)

    def progress_at(step_i: int, secs: float) -> float:
        if cfg.budget is not None:
            return secs / cfg.budget
        return step_i / max(total_steps, 1)

    epoch = start_epoch
    while True:
        if cfg.budget is None and epoch >= cfg.epochs:
            break
        if cfg.budget is not None and _budget_spent(elapsed, cfg.budget, world, device):
            break
        model.train()
        loss_fn = _loss_fn(cfg, model, lip0, forward)
        t0 = time.perf_counter()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        bar = _Progress(cfg.progress, steps_per_epoch, f"epoch {epoch + 1}")
        for xb, yb in batches.batches(epoch):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            lr = cfg.lr * lr_factor(cfg.schedule, progress_at(step, elapsed + time.perf_counter() - t0))
            for g in opt.param_groups:
                g["lr"] = lr
            loss, logits = loss_fn(xb, yb)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {float(loss)} at epoch {epoch + 1}, step {step}; "
                    f"the last good checkpoint is {ckpt_path if ckpt_path.exists() else '(none yet)'}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            n = yb.shape[0]
            tot_loss += float(loss.detach()) * n
            tot_correct += int((logits.argmax(1) == yb).sum())
            tot_n += n
            bar.update(loss=f"{tot_loss / tot_n:.4f}", acc=f"{tot_correct / tot_n:.3f}")
            if cfg.budget is not None and _budget_spent(elapsed + time.perf_counter() - t0, cfg.budget, world, device):
                break
        bar.close()
        epoch_time = time.perf_counter() - t0
        if world > 1:
            tot_loss, tot_correct, tot_n = _all_reduce_sums(device, tot_loss, tot_correct, tot_n)
        elapsed += epoch_time
        epoch += 1
        row = {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "train_loss": tot_loss / max(tot_n, 1),
            "train_accuracy": tot_correct / max(tot_n, 1),
            "epoch_seconds": epoch_time,
            "train_seconds": elapsed,
        }
        if not main_rank:
            continue
        if cfg.eval_every and (epoch % cfg.eval_every == 0):
            clean, cert = _evaluate(model, eval_x, eval_y, eval_eps, device)
            row[f"{eval_name}_accuracy"] = clean
            row[f"{eval_name}_certified@{eval_eps:g}"] = cert
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(
            {
                "config": cfg.to_dict(),
                "model_name": cfg.model,
                "model_kwargs": dict(cfg.model_args),
                "data_info": data_info,
                "model_state": model.state_dict(),
                "optimizer_state": opt.state_dict(),
                "scheduler_state": {"step": step, "elapsed": elapsed, "lip0": lip0},
                "epoch": epoch,
                "rng": _rng_state(),
            },
            ckpt_path,
        )
        msg = f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.3f}  {epoch_time:.1f}s"
        if f"{eval_name}_accuracy" in row:
            msg += f"  {eval_name} acc {row[f'{eval_name}_accuracy']:.3f}  cert@{eval_eps:g} {row[f'{eval_name}_certified@{eval_eps:g}']:.3f}"
        log(msg)

    model.eval()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if not main_rank:
            return {}
    from .report import write_report

    return write_report(model, cfg, splits, data_info, out, epochs=epoch, train_seconds=elapsed, device=device, log=log,
                        epochs_completed=step / max(steps_per_epoch, 1))
