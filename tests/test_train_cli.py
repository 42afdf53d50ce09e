"""End-to-end: train → files → certify → same numbers; resume; error paths."""
import json
import subprocess
import sys

import pytest
import torch

import liptorch
from liptorch import cli
from liptorch.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from liptorch.train import TrainConfig, TrainingDiverged, train

FAST = ["--data", "digits", "--model", "bcop-small", "--no-progress", "--batch-size", "256"]


def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "bcop"
    code = cli.main(FAST + ["--epochs", "2", "--out", str(out), "--lr", "0.005"])
    assert code == 0
    return out


def test_train_writes_every_artifact(trained_run):
    for name in ("checkpoint.pt", "metrics.jsonl", "report.json", "report.md", "certified_accuracy.png"):
        assert (trained_run / name).is_file(), name
    report = json.loads((trained_run / "report.json").read_text())
    for key in ("clean_accuracy", "certified_accuracy", "lipschitz_bound", "train_seconds", "epochs", "config"):
        assert key in report
    assert report["epochs"] == 2 and report["epochs_completed"] == 2.0
    assert 1.0 <= report["lipschitz_bound"] < 1.001
    assert report["clean_accuracy"] > 0.3
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert (trained_run / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_certify_reproduces_the_report(trained_run, capsys):
    report = json.loads((trained_run / "report.json").read_text())
    code, out, err = run_cli(["certify", str(trained_run), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["clean_accuracy"] == report["clean_accuracy"]
    assert res["certified_accuracy"] == report["certified_accuracy"]
    model = liptorch.load_checkpoint(trained_run)
    assert not model.training


def test_checkpoint_loads_with_weights_only(trained_run):
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and "optimizer_state" in state and "rng" in state and "config" in state


def _interrupt_after(epochs):
    seen = {"n": 0}

    def log(msg):
        if msg.startswith("epoch"):
            seen["n"] += 1
            if seen["n"] == epochs:
                raise KeyboardInterrupt

    return log


def test_kill_and_resume_gives_identical_weights(tmp_path):
    base = dict(data="digits", model="bcop-small", epochs=3, batch_size=256, lr=0.005, progress=False, seed=3,
                limit_train=600, limit_test=100)
    full = TrainConfig(**base, out=str(tmp_path / "full"))
    train(full, log=lambda m: None)
    part = TrainConfig(**base, out=str(tmp_path / "part"))
    with pytest.raises(KeyboardInterrupt):
        train(part, log=_interrupt_after(1))
    assert read_checkpoint(tmp_path / "part")["epoch"] == 1
    train(TrainConfig(out=str(tmp_path / "part"), progress=False), resume=True, log=lambda m: None)
    a = read_checkpoint(tmp_path / "full")["model_state"]
    b = read_checkpoint(tmp_path / "part")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import liptorch.train as tr

    calls = {"n": 0}
    real = tr.hinge_loss

    def flaky(logits, y, margin):
        calls["n"] += 1
        loss = real(logits, y, margin)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(tr, "hinge_loss", flaky)
    cfg = TrainConfig(data="digits", model="bcop-small", epochs=3, batch_size=512, progress=False,
                      out=str(tmp_path / "nan"), limit_train=1000, limit_test=50)
    with pytest.raises(TrainingDiverged, match="nan"):
        train(cfg, log=lambda m: None)
    assert read_checkpoint(tmp_path / "nan")["epoch"] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["certify", "/nonexistent/run"], "no checkpoint"),
        (["train", "--epochs", "0", "--data", "digits"], "--epochs"),
        (["train", "--model", "nope", "--epochs", "1", "--no-progress"], "unknown model"),
        (["train", "--data", "nope", "--epochs", "1"], "nope"),
        (["train", "--lr", "-1"], "--lr"),
        (["certify", "/tmp", "--eps", "abc"], "checkpoint"),
    ],
)
def test_cli_errors_are_one_line(args, needle, capsys, tmp_path):
    if "train" in args:
        args = args + ["--out", str(tmp_path / "x")]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("liptorch: error:"), err
    assert needle in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    code, out, err = run_cli(["certify", str(tmp_path)], capsys)
    assert code == 2 and "cannot read checkpoint" in err
    with pytest.raises(CheckpointError):
        liptorch.load_checkpoint(tmp_path)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a liptorch checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "c.pt")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        save_checkpoint({"a": Boom()}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["a"], torch.ones(2))


def test_module_entry_point_and_models_listing():
    proc = subprocess.run([sys.executable, "-m", "liptorch", "models"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("lbdn-mlp", "bcop-small", "bcop-large", "bjorck-fc3", "sandwich-kwl-s", "soc-lipconvnet-5"):
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "liptorch", "certify", "/nonexistent"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_verify_and_attack_commands(trained_run, capsys):
    code, out, err = run_cli(["verify", str(trained_run), "--points", "8", "--steps", "30", "--restarts", "2",
                              "--iters", "10", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["sound"] and 0.5 < res["lower_bound"] <= res["upper_bound"]
    convs = [r for r in res["layers"] if r["type"] == "BCOPConv2d"]
    assert convs and all(r["lower"] <= r["bound"] for r in convs)
    code, out, err = run_cli(["attack", str(trained_run), "--points", "30", "--steps", "30", "--restarts", "1",
                              "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["violations"] == 0 and res["certified_points"] > 0
    assert res["ratio_min"] is None or res["ratio_min"] >= 1.0
