"""Wasserstein-1 estimation against known answers, and 2-process DDP training."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from liptorch.wasserstein import default_critic, estimate, exact_w1_1d


def test_gaussians_with_equal_covariance():
    g = torch.Generator().manual_seed(0)
    d = 8
    mu = torch.zeros(d)
    mu[0], mu[1] = 1.5, -1.0
    true = float(mu.norm())  # W1 of N(μ1, Σ) and N(μ2, Σ) is ‖μ1 − μ2‖
    a = torch.randn(4000, d, generator=g) * 0.7
    b = torch.randn(4000, d, generator=g) * 0.7 + mu
    early = estimate(b, a, steps=5, lr=1e-3, seed=0, critic=default_critic((d,), width=32, depth=2))
    res = estimate(b, a, steps=300, lr=5e-3, seed=0, eval_every=100, critic=default_critic((d,), width=32, depth=2))
    assert res.lipschitz_bound >= 1.0
    assert res.ci_low - 0.05 <= true  # a lower bound, up to sampling error
    assert abs(res.estimate - true) < 0.1 * true
    assert abs(res.estimate - true) < abs(early.estimate - true)  # approaches the truth as it trains
    assert res.history and res.history[-1][0] == 300


def test_one_dimensional_exact_answer():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3000, 1, generator=g) * 0.5
    q = torch.rand(3000, 1, generator=g) * 3 - 0.5
    hold_p, hold_q = p[::2], q[::2]
    true = exact_w1_1d(p, q)
    res = estimate(p, q, steps=400, lr=5e-3, seed=0, critic=default_critic((1,), width=32, depth=2))
    assert res.estimate <= true + 4 * res.std_error + 0.02
    assert res.estimate > 0.8 * true
    assert exact_w1_1d(hold_p, hold_q) > 0


def test_image_critic_and_validation():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(200, 1, 8, 8, generator=g) * 0.5
    b = torch.rand(200, 1, 8, 8, generator=g) * 0.5 + 0.3
    res = estimate(b, a, steps=30, lr=5e-3, batch_size=32)
    true_lower = float((b.mean(0) - a.mean(0)).norm())  # f(x) = <x, u> is 1-Lipschitz
    assert res.estimate > 0.5 * true_lower
    with pytest.raises(ValueError, match="sample shapes"):
        estimate(a, torch.rand(10, 3))
    with pytest.raises(ValueError):
        exact_w1_1d(torch.ones(3), torch.ones(4))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_ddp_training(tmp_path):
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port=29517", "-m", "liptorch", "train", "--data", "digits",
           "--model", "bcop-small", "--epochs", "2", "--batch-size", "128", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 talks and writes
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # Steps count each rank's shard once: 1348 training digits / (2 ranks × 128) → 6 steps per epoch.
    assert rows[-1]["step"] == 2 * math.ceil(1348 / 2 / 128)
    report = json.loads((out / "report.json").read_text())
    assert report["clean_accuracy"] > 0.3
    # --resume in DDP continues from the checkpoint (nothing left to do: same final weights).
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in state["model_state"].items():
        assert torch.equal(v, again["model_state"][k])
