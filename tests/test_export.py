"""Tests for liptorch.exporting (liptorch.export): constrained models → plain PyTorch modules.

Every check trains the model for a couple of optimizer steps first (so the exported
operators are not the initial ones), then compares the exported module with the
original in eval mode: max |Δ| / max |y| ≤ 1e-5 in float32.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from liptorch import exporting as ex
from liptorch.checkpoint import save_checkpoint
from liptorch.models import create_model
from liptorch.nn import (
    LBDN,
    BCOPConv2d,
    ChannelPad,
    FirstChannels,
    GroupSort,
    HouseholderActivation,
    InvertibleDownsample,
    LipschitzModule,
    LLNLinear,
    ManifoldPool,
    MaxMin,
    MLPHead,
    Normalize,
    OrthogonalLinear,
    PairMaxPool,
    SandwichConv2d,
    SandwichLinear,
    SandwichOutput,
    Scale,
    SOCConv2d,
    SpatialPad,
)

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def train_steps(model: nn.Module, shape, steps: int = 2, lr: float = 0.02, dtype=torch.float32) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if params:
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            y = model(torch.randn(8, *shape, dtype=dtype))
            (y.square().mean() + y.mean()).backward()
            opt.step()
    model.eval()


def assert_plain(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        assert not isinstance(sub, LipschitzModule), name
        kind = type(sub).__module__
        assert kind.startswith("torch.nn") or type(sub) in ex.FIXED_MODULES, (name, type(sub))
    assert not any(p.requires_grad for p in module.parameters())
    assert not module.training


def check_export(model: nn.Module, shape, tol: float = TOL, dtype=torch.float32, **kw) -> nn.Module:
    exported = ex.export(model, **kw)
    assert_plain(exported)
    x = torch.rand(6, *shape, dtype=dtype) * 2 - 0.5
    with torch.no_grad():
        ref, out = model(x), exported(x)
    _, rel = ex.compare_outputs(ref, out)
    assert rel <= tol, (type(model).__name__, rel)
    return exported


# ----------------------------------------------------------------------------------------
# layer families
# ----------------------------------------------------------------------------------------
LAYERS = {
    "bcop-odd": (lambda: BCOPConv2d(3, 5, 3), (3, 6, 6)),
    "bcop-even-stride2": (lambda: BCOPConv2d(2, 4, 4, stride=2), (2, 6, 6)),
    "bcop-even-shrink": (lambda: BCOPConv2d(5, 3, 2, bias=False), (5, 5, 5)),
    "bcop-1x1": (lambda: BCOPConv2d(4, 6, 1), (4, 3, 3)),
    "bcop-odd-stride2": (lambda: BCOPConv2d(2, 5, 6, stride=2), (2, 6, 6)),
    "bcop-k2-stride2": (lambda: BCOPConv2d(2, 3, 2, stride=2), (2, 4, 4)),
    "bcop-k1-stride2": (lambda: BCOPConv2d(2, 3, 1, stride=2), (2, 4, 4)),
    "orthogonal": (lambda: OrthogonalLinear(7, 4), (7,)),
    "soc": (lambda: SOCConv2d(3, 6, 3), (3, 6, 6)),
    "soc-stride2-grow": (lambda: SOCConv2d(3, 14, 3, stride=2, eval_terms=9), (3, 6, 6)),
    "soc-shrink-1x1": (lambda: SOCConv2d(8, 3, 1, bias=False), (8, 4, 4)),
    "soc-stride2-shrink": (lambda: SOCConv2d(4, 10, 3, stride=2), (4, 4, 4)),
    "soc-circular": (lambda: SOCConv2d(3, 6, 3, padding_mode="circular"), (3, 6, 5)),
    "soc-circular-stride2-shrink": (lambda: SOCConv2d(4, 10, 3, stride=2, padding_mode="circular"), (4, 4, 6)),
    "soc-circular-k5-tiny": (lambda: SOCConv2d(3, 3, 5, padding_mode="circular"), (3, 1, 2)),
    "sandwich-linear": (lambda: SandwichLinear(6, 5, scale=2.0), (6,)),
    "sandwich-linear-tanh": (lambda: SandwichLinear(6, 4, activation="tanh"), (6,)),
    "sandwich-linear-id": (lambda: SandwichLinear(6, 4, activation=None), (6,)),
    "sandwich-output": (lambda: SandwichOutput(6, 3, scale=1.5), (6,)),
    "lbdn": (lambda: LBDN(6, [8, 5], 3, gamma=2.0), (6,)),
    "lln": (lambda: LLNLinear(6, 4), (6,)),
    "mlp-head": (lambda: MLPHead(6, 9, 4, beta=2.0), (6,)),
    "householder-1": (lambda: HouseholderActivation(6, order=1), (6, 3, 3)),
    "householder-2": (lambda: HouseholderActivation(6, order=2), (6, 3, 3)),
    "manifold-pool": (lambda: ManifoldPool(6), (6, 3, 3)),
    "pair-max-pool": (lambda: PairMaxPool(6), (6, 2, 2)),
    "maxmin": (lambda: MaxMin(), (6,)),
    "groupsort": (lambda: GroupSort(3), (6, 2, 2)),
    "channel-pad": (lambda: ChannelPad(7), (3, 2, 2)),
    "first-channels": (lambda: FirstChannels(2), (5, 2, 2)),
    "normalize": (lambda: Normalize([0.1, 0.2], [0.5, 0.25]), (2, 3, 3)),
    "scale": (lambda: Scale(1.7), (4,)),
    "spatial-pad": (lambda: SpatialPad(7), (2, 4, 5)),
    "unshuffle": (lambda: InvertibleDownsample(2), (2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_export_matches(name):
    torch.manual_seed(sorted(LAYERS).index(name))
    build, shape = LAYERS[name]
    model = build()
    train_steps(model, shape)
    check_export(model, shape)


@pytest.mark.parametrize("kind", ["stride1-even", "stride1-odd", "stride2", "linear", "pointwise"])
@pytest.mark.parametrize("mode", ["fft", "dense"])
def test_sandwich_conv_fft_and_dense(kind, mode):
    torch.manual_seed(3)
    layer, shape = {
        "stride1-even": (SandwichConv2d(2, 3, 3, 6), (2, 6, 6)),
        "stride1-odd": (SandwichConv2d(2, 3, 3, (5, 4), activation="leaky_relu"), (2, 5, 4)),
        "stride2": (SandwichConv2d(2, 4, 4, 8, stride=2, scale=1.3), (2, 8, 8)),
        "linear": (SandwichConv2d(3, 2, 3, 5, activation=None), (3, 5, 5)),
        "pointwise": (SandwichConv2d(2, 3, 1, 4), (2, 4, 4)),
    }[kind]
    train_steps(layer, shape)
    exported = check_export(layer, shape, sandwich_conv=mode)
    convs = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
    fourier = [m for m in exported.modules() if isinstance(m, ex.FourierConv2d)]
    if kind == "pointwise":
        assert len(convs) == 2 and not fourier and convs[0].kernel_size == (1, 1)
    elif mode == "dense":
        assert not fourier and all(c.padding_mode == "circular" for c in convs)
        h, w = layer.conv_size
        assert convs[0].kernel_size == (h + 1 - h % 2, w + 1 - w % 2)
    else:
        assert not convs and len(fourier) == (1 if kind == "linear" else 2)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["pad", "embed"])
def test_bcop_even_kernel_modes(mode, stride):
    """Wrap s·k'/2 before and s·(k'/2 − 1) after == kernel with s zero taps appended and
    symmetric wrap s·k'/2; the pixel-unshuffle is folded into one stride-s conv."""
    torch.manual_seed(5)
    layer = BCOPConv2d(3, 4, 4, stride=stride)
    train_steps(layer, (3, 8, 8))
    exported = check_export(layer, (3, 8, 8), bcop_even=mode)
    assert not any(isinstance(m, nn.PixelUnshuffle) for m in exported.modules())
    (conv,) = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
    assert conv.stride == (stride, stride)
    op = layer.cached_operator()
    if mode == "embed":
        assert conv.kernel_size == (4 + stride, 4 + stride) and conv.padding == (2, 2)
        assert conv.padding_mode == "circular"
        assert conv.weight[..., 4:, :].abs().max() == 0 and conv.weight[..., :, 4:].abs().max() == 0
        core = conv.weight[..., :4, :4]
    else:
        (pad,) = [m for m in exported.modules() if isinstance(m, nn.CircularPad2d)]
        assert tuple(pad.padding) == ((2, 1, 2, 1) if stride == 1 else (2, 0, 2, 0))
        assert conv.kernel_size == (4, 4) and conv.padding == (0, 0)
        core = conv.weight
    if stride == 1:
        torch.testing.assert_close(core, op, rtol=0, atol=0)
    else:  # K[o, c·4 + r·2 + t, u, v] = W[o, c, 2u + r, 2v + t]
        torch.testing.assert_close(core[:, 1, 3, 0], op[:, 1 * 4 + 1 * 2 + 0, 1, 0], rtol=0, atol=0)
        assert torch.equal(core.flatten().sort().values, op.flatten().sort().values)


def test_float64_export_is_exact_to_rounding():
    torch.manual_seed(1)
    model = nn.Sequential(BCOPConv2d(2, 4, 3), MaxMin(), SOCConv2d(4, 4, 3), nn.Flatten(),
                          SandwichLinear(4 * 16, 6), LLNLinear(6, 3)).double()
    train_steps(model, (2, 4, 4), dtype=torch.float64)
    exported = check_export(model, (2, 4, 4), tol=1e-12, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in exported.parameters())


def test_export_is_a_snapshot_and_leaves_model_untouched():
    torch.manual_seed(2)
    model = nn.Sequential(OrthogonalLinear(5, 6), MaxMin()).train()
    exported = ex.export(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    x = torch.randn(4, 5)
    with torch.no_grad():
        before = exported(x).clone()
    train_steps(model, (5,), steps=1, lr=0.1)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(exported(x), before)
        assert not torch.allclose(model(x), before)


# ----------------------------------------------------------------------------------------
# zoo models
# ----------------------------------------------------------------------------------------
ZOO = {
    "bcop-small": ("bcop-small", 1, {}),
    "lbdn-mlp": ("lbdn-mlp", 1, {}),
    "lbdn-mlp-lln": ("lbdn-mlp", 1, {"head": "lln", "hidden": (32, 16)}),
    "bjorck-fc3": ("bjorck-fc3", 1, {"width": 64}),
    "sandwich-kwl-s": ("sandwich-kwl-s", 1, {}),
    "soc-ortho-maxmin": ("soc-lipconvnet-5", 3, {"width": 4}),
    "soc-lln-hh1-maxpool": ("soc-lipconvnet-10", 3, {"width": 4, "head": "lln", "activation": "hh1", "pool": "max"}),
    "soc-mlp-hh2-manifold": ("soc-lipconvnet-5", 3, {"width": 4, "head": "mlp", "activation": "hh2", "pool": "manifold"}),
}


@pytest.mark.parametrize("key", sorted(ZOO))
def test_zoo_model_export(key):
    torch.manual_seed(11)
    name, channels, kw = ZOO[key]
    model = create_model(name, channels, (8, 8), 10, **kw)
    shape = (channels, 8, 8)
    train_steps(model, shape)
    exported = check_export(model, shape)
    assert isinstance(exported, nn.Sequential)
    if name == "lbdn-mlp" and "head" not in kw:
        # the LBDN is exported through its own merged-MLP export
        assert sum(isinstance(m, nn.Linear) for m in exported) == 4


def test_small_soc_stack_with_stride_and_channel_change():
    torch.manual_seed(4)
    model = nn.Sequential(
        SOCConv2d(3, 8, 3), MaxMin(), SOCConv2d(8, 16, 3, stride=2), HouseholderActivation(16, 2),
        SOCConv2d(16, 6, 1, stride=2), nn.Flatten(), LLNLinear(6 * 4, 5),
    )
    train_steps(model, (3, 8, 8))
    exported = check_export(model, (3, 8, 8))
    exps = [m for m in exported if isinstance(m, ex.SkewExpConv2d)]
    assert [m.terms for m in exps] == [15, 15, 15]
    assert sum(isinstance(m, nn.PixelUnshuffle) for m in exported) == 2


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


class _SubclassedBCOP(BCOPConv2d):
    pass


def test_unexportable_modules_raise_with_their_path():
    with pytest.raises(ValueError, match=r"'1\.0'.*_Custom"):
        ex.export(nn.Sequential(OrthogonalLinear(3, 3), nn.Sequential(_Custom())))
    with pytest.raises(ValueError, match="_SubclassedBCOP"):
        ex.export(nn.Sequential(_SubclassedBCOP(2, 2, 3)))
    with pytest.raises(ValueError, match="containers"):
        ex.export(nn.ModuleList([nn.ReLU()]))
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match="hooks"):
        ex.export(hooked)
    with pytest.raises(ValueError, match="nn.Module"):
        ex.export("model")
    with pytest.raises(ValueError, match="sandwich_conv"):
        ex.export(nn.ReLU(), sandwich_conv="fast")
    with pytest.raises(ValueError, match="bcop_even"):
        ex.export(nn.ReLU(), bcop_even="zero")


def test_register_exporter_for_a_custom_module():
    ex.register_exporter(_Custom, lambda m, ctx: ex.ConstantScale(2.0))
    try:
        out = ex.export(nn.Sequential(_Custom(), nn.ReLU()))
        assert isinstance(out[0], ex.ConstantScale)
        ex.register_exporter(_Custom, lambda m, ctx: m)  # returns a non-plain module
        with pytest.raises(ValueError, match="non-plain"):
            ex.export(_Custom())
    finally:
        ex._EXPORTERS.pop(_Custom, None)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        ex.register_exporter(int, lambda m, ctx: m)


# ----------------------------------------------------------------------------------------
# files: TorchScript (.pt) and ONNX
# ----------------------------------------------------------------------------------------
def _make_run(tmp_path, name, channels, kw, size=(8, 8)):
    model = create_model(name, channels, size, 10, **kw)
    train_steps(model, (channels, *size))
    info = {"name": "toy", "channels": channels, "image_size": list(size), "num_classes": 10, "mean": [0.0] * channels}
    run = tmp_path / f"run-{name}"
    save_checkpoint({"model_name": name, "model_kwargs": kw, "data_info": info, "model_state": model.state_dict()},
                    run / "checkpoint.pt")
    return run, model.eval()


_NO_LIPTORCH = """
import sys
sys.modules["liptorch"] = None  # any import of liptorch now fails
import torch
model = torch.jit.load(sys.argv[1])
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
try:
    import liptorch
except ImportError:
    pass
else:
    raise SystemExit("liptorch was importable")
"""


def test_export_run_torchscript_loads_without_liptorch(tmp_path):
    torch.manual_seed(7)
    run, model = _make_run(tmp_path, "soc-lipconvnet-5", 3, {"width": 4, "activation": "hh2", "pool": "manifold",
                                                              "head": "lln"})
    result = ex.export_run(run, tmp_path / "model.pt", probe_batch=8, timing_batch=8, repeats=1)
    assert result["format"] == "torchscript" and result["checked"].startswith("saved file")
    assert result["max_rel_diff"] <= TOL
    t = result["timing"]
    assert t["batch_size"] == 8 and t["original_ms"] > 0 and t["exported_ms"] > 0 and t["saved_ms"] > 0
    assert math.isclose(t["speedup"], t["original_ms"] / t["exported_ms"], rel_tol=1e-9)
    x = torch.rand(5, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(_NO_LIPTORCH)
    subprocess.run([sys.executable, str(script), str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        _, rel = ex.compare_outputs(model(x), torch.load(tmp_path / "y.pt"))
    assert rel <= TOL


def test_export_run_rejects_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.pt .*\.onnx"):
        ex.export_run(tmp_path, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="repeats"):
        ex.export_run(tmp_path, tmp_path / "model.pt", repeats=0)
    real = ex.importlib.util.find_spec
    monkeypatch.setattr(ex.importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        ex.export_run(tmp_path, tmp_path / "model.onnx")


def test_all_fixed_modules_script_and_onnx_round_trip(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    torch.manual_seed(8)
    model = nn.Sequential(
        Normalize([0.3, 0.4], [0.5, 0.6]), SpatialPad(6), BCOPConv2d(2, 4, 4, stride=2), MaxMin(),
        SOCConv2d(4, 6, 3), SOCConv2d(6, 6, 3, padding_mode="circular"), HouseholderActivation(6, 2), HouseholderActivation(6, 1), ManifoldPool(6),
        ChannelPad(4), GroupSort(2), SandwichConv2d(4, 4, 3, 3), PairMaxPool(4), FirstChannels(1), Scale(1.5),
        nn.Flatten(), MLPHead(9, 8, 3),
    )
    train_steps(model, (2, 5, 5))
    exported = check_export(model, (2, 5, 5))
    assert {type(m) for m in exported.modules()} >= set(ex.FIXED_MODULES)
    x = torch.rand(3, 2, 5, 5)
    with torch.no_grad():
        ref = model(x)
        scripted = ex._script(exported)
        assert ex.compare_outputs(ref, scripted(x))[1] <= TOL
        ex._save_onnx(exported, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x7 = torch.rand(7, 2, 5, 5)  # another batch size: the batch axis is dynamic
    got = session.run(None, {session.get_inputs()[0].name: x7.numpy()})[0]
    with torch.no_grad():
        assert ex.compare_outputs(model(x7), torch.from_numpy(got))[1] <= TOL


def test_export_run_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    torch.manual_seed(9)
    run, _ = _make_run(tmp_path, "bcop-small", 1, {})
    result = ex.export_run(run, tmp_path / "out" / "model.onnx", probe_batch=8, timing_batch=8, repeats=1)
    assert result["format"] == "onnx" and result["checked"] == "saved file (onnxruntime)"
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert result["max_rel_diff"] <= TOL and result["timing"]["saved_ms"] > 0


def test_fixed_modules_validate_inputs():
    with pytest.raises(ValueError, match="even"):
        ex.PairMaxMin()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="channels"):
        ex.ChannelResize(2, "pad")(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        ex.ChannelResize(2, "crop")
    with pytest.raises(ValueError, match="FourierConv2d expects input"):
        ex.FourierConv2d(torch.zeros(6, 2, 2, dtype=torch.complex64), None, (3, 3))(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="odd k"):
        ex.SkewExpConv2d(torch.zeros(2, 3, 3, 2, 2), None, 3, 3)
    with pytest.raises(ValueError, match="in_channels"):
        ex.SkewExpConv2d(torch.zeros(2, 3, 3, 1, 1), None, 4, 3)
    with pytest.raises(ValueError, match=r"expects \(N, 2, H, W\)"):
        ex.SkewExpConv2d(torch.zeros(2, 3, 3, 1, 1), None, 2, 3)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        ex.compare_outputs(torch.zeros(2), torch.zeros(3))


def test_top_level_export_function():
    import liptorch
    from liptorch.models import create_model

    torch.manual_seed(0)
    model = create_model("bcop-small", 1, (8, 8), 10).eval()
    plain = liptorch.export(model)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(plain(x), model(x), rtol=1e-5, atol=1e-6)
