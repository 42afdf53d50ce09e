"""The two benchmarks run end to end on tiny settings and report what they claim."""
import json

import pytest
import torch

from liptorch import bench
from liptorch.cli import main


def test_layer_benchmark_reports_every_layer_against_conv():
    lines = []
    res = bench.run_layer_benchmark(batch=2, channels=4, size=8, kernel=3, rounds=1, threads=1, print_fn=lines.append)
    assert set(res) == set(bench.layer_factories(4, 8, 3))
    assert res["nn.Conv2d"]["train_ratio"] == pytest.approx(1.0)
    for name, t in res.items():
        assert t["train"] > 0 and t["eval"] > 0
        assert t["train_ratio"] == pytest.approx(t["train"] / res["nn.Conv2d"]["train"])
        assert any(line.startswith(name) for line in lines)


def test_time_layers_uses_cached_eval_operator():
    from liptorch.nn.sandwich import SandwichConv2d

    layer = SandwichConv2d(4, 4, 3, 8)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    bench.time_layers({"s": layer}, x, rounds=1, warmup=0)
    assert not layer.training
    before = layer(x.detach())
    assert torch.equal(before, layer(x.detach()))


@pytest.mark.parametrize("isolate", [False, True])
def test_budget_benchmark_trains_each_family_for_the_budget(tmp_path, monkeypatch, isolate):
    if isolate:
        families = ["BCOP"]  # a fresh spawned process sees the real table (bcop-large; 8x8 digits keep it cheap)
    else:
        # Tiny stand-ins keep the test fast; the table's code path is the real one.
        monkeypatch.setitem(bench.BUDGET_MODELS, "BCOP", ("bcop-small", {}, {"loss": "hinge", "eps_train": 0.1, "lr": 0.01}))
        monkeypatch.setitem(bench.BUDGET_MODELS, "Bjorck", ("bjorck-fc3", {"width": 16}, {"lr": 0.01}))
        families = ["BCOP", "Bjorck"]
    lines = []
    budget = 1.0 if not isolate else 0.5
    rows = bench.run_budget_benchmark(budget, data="digits", out_dir=str(tmp_path), families=families, threads=1,
                                      print_fn=lines.append, isolate=isolate, batch_size=64)
    assert [r["family"] for r in rows] == families
    for r in rows:
        assert 0.0 <= r["clean_accuracy"] <= 1.0
        assert r["epochs_completed"] > 0 and r["seconds_per_epoch"] > 0 and r["peak_memory_mb"] > 0
        # certified accuracy can never exceed clean accuracy, and shrinks with the radius
        vals = list(r["certified_accuracy"].values())
        assert all(v <= r["clean_accuracy"] + 1e-12 for v in vals)
        assert vals == sorted(vals, reverse=True)
        assert 0.0 < r["lipschitz_bound"] <= 1.001  # orthogonal layers: measured bound close to 1
        assert (tmp_path / r["family"].lower() / "report.json").exists()
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert [r["family"] for r in saved] == families
    assert len(lines) == len(families) and all(line.startswith("| ") for line in lines)


def test_budget_benchmark_rejects_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        bench.run_budget_benchmark(1.0, data="digits", out_dir=str(tmp_path), families=["Nope"])


def test_bench_cli_rejects_bad_budget(capsys):
    assert main(["bench", "--budget", "-3"]) != 0
    assert "--budget" in capsys.readouterr().err


def test_layer_benchmark_repeats_report_median_and_range():
    lines = []
    res = bench.run_layer_benchmark(batch=2, channels=4, size=8, kernel=3, rounds=1, threads=1, repeats=3,
                                    print_fn=lines.append, markdown=True)
    for name, t in res.items():
        assert len(t["train_ratios"]) == 3 and len(t["eval_ratios"]) == 3
        assert min(t["train_ratios"]) <= t["train_ratio"] <= max(t["train_ratios"])
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        assert f"{t['train_ratio']:.2f}x ({min(t['train_ratios']):.2f}-{max(t['train_ratios']):.2f})" in row
    assert res["nn.Conv2d"]["train_ratios"] == [1.0, 1.0, 1.0]
    assert "x 3 runs (median, range)" in lines[0]


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"repeats": 0}, {"batch": -1}, {"threads": 1.5}, {"repeats": True}])
def test_layer_benchmark_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match=r"must be an integer >= 1"):
        bench.run_layer_benchmark(**{"batch": 2, "channels": 4, "size": 8, "rounds": 1, "threads": 1, **kwargs},
                                  print_fn=lambda line: None)


def test_bench_command_reports_bad_rounds_as_one_line(capsys):
    assert main(["bench", "--rounds", "0"]) == 2
    assert "rounds must be an integer >= 1" in capsys.readouterr().err
