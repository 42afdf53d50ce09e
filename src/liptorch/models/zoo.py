"""The model zoo: the seed papers' architectures, built for any data set's channels,
image size and class count.  Every model is a :class:`LipschitzClassifier` whose
inputs are raw pixels in [0, 1]; normalisation lives inside the model."""
from __future__ import annotations

import math

from torch import nn

from ..nn.normalize import Normalize, Scale
from ..nn.simple import MaxMin
from ..nn.spatial import SpatialPad
from .classifier import LipschitzClassifier
from .registry import register_model

__all__: list[str] = []


def _mean(in_channels: int, mean) -> list[float]:
    if mean is None:
        return [0.0] * in_channels
    mean = [float(m) for m in (mean if hasattr(mean, "__len__") else [mean] * in_channels)]
    if len(mean) != in_channels:
        raise ValueError(f"mean has {len(mean)} entries for {in_channels} input channels")
    return mean


def _check_divisible(name: str, image_size, d: int) -> None:
    if image_size[0] % d or image_size[1] % d:
        raise ValueError(f"{name} needs image sides divisible by {d}, got {image_size[0]}x{image_size[1]}")


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    return gamma


# ----------------------------------------------------------------------------- Sandwich
@register_model("lbdn-mlp", family="sandwich", description="Sandwich MLP (LBDN), hidden 256-256-128, bound gamma")
def lbdn_mlp(in_channels, image_size, num_classes, gamma=1.0, hidden=(256, 256, 128), head="global", mean=None, std=None):
    from ..nn.heads import LLNLinear
    from ..nn.sandwich import LBDN, SandwichLinear

    gamma = _check_gamma(gamma)
    d = in_channels * image_size[0] * image_size[1]
    hidden = [int(h) for h in hidden]
    pre = [Normalize(_mean(in_channels, mean), 1.0), nn.Flatten()]
    if head == "global":
        features = nn.Sequential(*pre, LBDN(d, hidden, num_classes, gamma=gamma))
        head_mod: nn.Module = nn.Identity()
    elif head == "lln":
        layers = [*pre, Scale(math.sqrt(gamma))]
        widths = [d] + hidden
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(SandwichLinear(a, b))
        layers.append(Scale(math.sqrt(gamma)))
        features = nn.Sequential(*layers)
        head_mod = LLNLinear(widths[-1], num_classes)
    else:
        raise ValueError(f"lbdn-mlp head must be 'global' or 'lln', got {head!r}")
    return _nominal(LipschitzClassifier(features, head_mod, (in_channels, *image_size), num_classes), gamma)


def _nominal(model: LipschitzClassifier, value: float) -> LipschitzClassifier:
    """Record the bound the architecture is designed to have (the certificates always
    use the measured guaranteed bound instead)."""
    model.nominal_bound = float(value)
    return model


def _sandwich_kwl(width: int):
    def build(in_channels, image_size, num_classes, gamma=1.0, head="global", mean=None, std=None):
        from ..nn.heads import LLNLinear
        from ..nn.sandwich import SandwichConv2d, SandwichLinear, SandwichOutput

        gamma = _check_gamma(gamma)
        _check_divisible("sandwich-kwl", image_size, 4)
        h, w = image_size
        c1, c2, f = 32 * width, 64 * width, 512 * width
        g = math.sqrt(gamma)
        layers = [
            Normalize(_mean(in_channels, mean), 1.0),
            SandwichConv2d(in_channels, c1, 3, (h, w), scale=g),
            SandwichConv2d(c1, c1, 3, (h, w), stride=2),
            SandwichConv2d(c1, c2, 3, (h // 2, w // 2)),
            SandwichConv2d(c2, c2, 3, (h // 2, w // 2), stride=2),
            nn.Flatten(),
            SandwichLinear(c2 * (h // 4) * (w // 4), f),
            SandwichLinear(f, f),
        ]
        if head == "global":
            head_mod: nn.Module = SandwichOutput(f, num_classes, scale=g)
        elif head == "lln":
            layers.append(Scale(g))
            head_mod = LLNLinear(f, num_classes)
        else:
            raise ValueError(f"sandwich-kwl head must be 'global' or 'lln', got {head!r}")
        return _nominal(LipschitzClassifier(nn.Sequential(*layers), head_mod, (in_channels, h, w), num_classes), gamma)

    build.__doc__ = f"KW-Large with Sandwich layers, width x{width}"
    return build


for _suffix, _w in (("s", 1), ("m", 2), ("l", 4)):
    register_model(f"sandwich-kwl-{_suffix}", family="sandwich", description=f"KW-Large with Sandwich FFT convs, width x{_w}")(
        _sandwich_kwl(_w)
    )


# ----------------------------------------------------------------------------- BCOP / Björck
@register_model("bcop-small", family="bcop", description="BCOP KW-Small: 2 strided BCOP convs + 2 Björck linear, MaxMin")
def bcop_small(in_channels, image_size, num_classes, mean=None, std=None, bjorck_iters=20):
    from ..nn.bcop import BCOPConv2d
    from ..nn.orthogonal import OrthogonalLinear

    _check_divisible("bcop-small", image_size, 4)
    h, w = image_size
    kw = dict(bjorck_iters=bjorck_iters)
    features = nn.Sequential(
        BCOPConv2d(in_channels, 16, 4, stride=2, **kw), MaxMin(),
        BCOPConv2d(16, 32, 4, stride=2, **kw), MaxMin(),
        nn.Flatten(),
        OrthogonalLinear(32 * (h // 4) * (w // 4), 100, **kw), MaxMin(),
    )
    head = OrthogonalLinear(100, num_classes, **kw)
    return _nominal(LipschitzClassifier(features, head, (in_channels, h, w), num_classes), 1.0)


@register_model("bcop-large", family="bcop", description="BCOP KW-Large: 4 BCOP convs + 3 Björck linear, MaxMin")
def bcop_large(in_channels, image_size, num_classes, mean=None, std=None, bjorck_iters=20):
    from ..nn.bcop import BCOPConv2d
    from ..nn.orthogonal import OrthogonalLinear

    _check_divisible("bcop-large", image_size, 4)
    h, w = image_size
    kw = dict(bjorck_iters=bjorck_iters)
    features = nn.Sequential(
        BCOPConv2d(in_channels, 32, 3, **kw), MaxMin(),
        BCOPConv2d(32, 32, 4, stride=2, **kw), MaxMin(),
        BCOPConv2d(32, 64, 3, **kw), MaxMin(),
        BCOPConv2d(64, 64, 4, stride=2, **kw), MaxMin(),
        nn.Flatten(),
        OrthogonalLinear(64 * (h // 4) * (w // 4), 512, **kw), MaxMin(),
        OrthogonalLinear(512, 512, **kw), MaxMin(),
    )
    head = OrthogonalLinear(512, num_classes, **kw)
    return _nominal(LipschitzClassifier(features, head, (in_channels, h, w), num_classes), 1.0)


@register_model("bjorck-fc3", family="bcop", description="FC-3: Björck linear 1024-1024-1024 with MaxMin")
def bjorck_fc3(in_channels, image_size, num_classes, mean=None, std=None, width=1024, bjorck_iters=20):
    from ..nn.orthogonal import OrthogonalLinear

    h, w = image_size
    kw = dict(bjorck_iters=bjorck_iters)
    d = in_channels * h * w
    features = nn.Sequential(
        nn.Flatten(),
        OrthogonalLinear(d, width, **kw), MaxMin(),
        OrthogonalLinear(width, width, **kw), MaxMin(),
        OrthogonalLinear(width, width, **kw), MaxMin(),
    )
    head = OrthogonalLinear(width, num_classes, **kw)
    return _nominal(LipschitzClassifier(features, head, (in_channels, h, w), num_classes), 1.0)


# ----------------------------------------------------------------------------- SOC LipConvnet
def _activation(name: str, channels: int) -> nn.Module:
    if name == "maxmin":
        return MaxMin()
    if name in ("hh1", "hh2"):
        from ..nn.householder import HouseholderActivation

        return HouseholderActivation(channels, order=int(name[-1]))
    raise ValueError(f"activation must be 'maxmin', 'hh1' or 'hh2', got {name!r}")


def _pool(name: str, channels: int) -> nn.Module:
    from ..nn.pooling import ManifoldPool, PairMaxPool

    if name == "max":
        return PairMaxPool(channels)
    if name == "manifold":
        return ManifoldPool(channels)
    raise ValueError(f"pool must be 'none', 'max' or 'manifold', got {name!r}")


def _lipconvnet(depth: int):
    def build(
        in_channels, image_size, num_classes, head="ortho", activation="maxmin", pool="none", width=32,
        mean=None, std=0.2507, train_terms=6, eval_terms=15, fast_backward=False, mlp_hidden=None,
        padding_mode="zeros",
    ):
        from ..nn.heads import LLNLinear, MLPHead
        from ..nn.soc import SOCConv2d

        if width < 2 or width % 2:
            raise ValueError(f"width must be an even integer >= 2, got {width}")
        if head not in ("ortho", "lln", "mlp"):
            raise ValueError(f"head must be 'ortho', 'lln' or 'mlp', got {head!r}")
        b = depth // 5
        soc = dict(train_terms=train_terms, eval_terms=eval_terms, fast_backward=fast_backward, padding_mode=padding_mode)
        h, w = image_size
        side = 32 * math.ceil(max(h, w) / 32)
        layers: list[nn.Module] = [Normalize(_mean(in_channels, mean), std if std is not None else 1.0)]
        if (h, w) != (side, side):
            layers.append(SpatialPad(side))
        if pool == "none":  # ICML 2021 / ICLR 2022 variant
            c_prev = in_channels
            for blk in range(5):
                c = width * 2**blk
                for _ in range(b - 1):
                    layers += [SOCConv2d(c_prev, c, 3, **soc), _activation(activation, c)]
                    c_prev = c
                k = 1 if blk == 4 else 3
                layers += [SOCConv2d(c_prev, 2 * c, k, stride=2, **soc), _activation(activation, 2 * c)]
                c_prev = 2 * c
            feat = c_prev
            spatial = side // 32
        else:  # NeurIPS 2022 variant: first 3→w conv, pooling after each downsampling, 1×1 final block
            layers += [SOCConv2d(in_channels, width, 3, **soc), _activation(activation, width)]
            c = width
            for blk in range(4):
                for _ in range(b - 1):
                    layers += [SOCConv2d(c, c, 3, **soc), _activation(activation, c)]
                layers += [SOCConv2d(c, 4 * c, 3, stride=2, **soc), _pool(pool, 4 * c)]
                c = 2 * c
            big = 4 * c
            layers += [SOCConv2d(c, big, 1, stride=2, **soc), _activation(activation, big)]
            for _ in range(b - 1):
                layers += [SOCConv2d(big, big, 1, **soc), _activation(activation, big)]
            if head != "mlp":
                layers.append(_pool(pool, big))
                feat = big // 2
            else:
                feat = big
            spatial = side // 32
        if head == "ortho":
            head_mod: nn.Module = nn.Sequential(SOCConv2d(feat, num_classes, 1, **soc), nn.Flatten())
            if spatial != 1:
                raise ValueError("the orthogonal 1x1 head needs a 1x1 final feature map (images up to 32x32)")
        else:
            layers.append(nn.Flatten())
            feat = feat * spatial * spatial
            head_mod = LLNLinear(feat, num_classes) if head == "lln" else MLPHead(feat, mlp_hidden or 2 * feat, num_classes)
        model = LipschitzClassifier(nn.Sequential(*layers), head_mod, (in_channels, h, w), num_classes)
        return _nominal(model, 1.0 / (std if std is not None else 1.0))

    build.__doc__ = f"SOC LipConvnet-{depth}"
    return build


for _n in range(5, 45, 5):
    register_model(
        f"soc-lipconvnet-{_n}", family="soc",
        description=f"SOC LipConvnet-{_n} (head ortho|lln|mlp, activation maxmin|hh1|hh2, pool none|max|manifold)",
    )(_lipconvnet(_n))
