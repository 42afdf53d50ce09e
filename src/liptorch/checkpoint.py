"""Checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled classes):
the model is rebuilt from its registry name and arguments, then its state dict is
loaded, so a checkpoint never executes code when read.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save_checkpoint", "read_checkpoint", "resolve_checkpoint", "FORMAT"]

FORMAT = "liptorch-checkpoint-v1"


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    state["format"] = FORMAT
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    p = Path(path_or_run_dir)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (expected a run directory containing checkpoint.pt, or a .pt file)")
    return p


def read_checkpoint(path_or_run_dir: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``; clear errors otherwise."""
    p = resolve_checkpoint(path_or_run_dir)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {p}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a liptorch checkpoint (format {FORMAT!r} expected)")
    for key in ("model_name", "model_kwargs", "data_info", "model_state"):
        if key not in state:
            raise CheckpointError(f"checkpoint {p} lacks the entry {key!r}")
    return state
