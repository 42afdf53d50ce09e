"""Lipschitz-constrained layers.  Each layer family lives in its own file."""
from .base import LipschitzModule
from .bcop import BCOPConv2d
from .heads import LLNLinear, MLPHead
from .householder import HouseholderActivation
from .normalize import Normalize, Scale
from .orthogonal import OrthogonalLinear
from .pooling import ManifoldPool, PairMaxPool
from .sandwich import LBDN, SandwichConv2d, SandwichLinear, SandwichOutput
from .simple import ChannelPad, FirstChannels, GroupSort, InvertibleDownsample, MaxMin, OneLipschitz
from .soc import SOCConv2d
from .spatial import SpatialPad

BjorckLinear = OrthogonalLinear

__all__ = [
    "LipschitzModule",
    "BCOPConv2d",
    "BjorckLinear",
    "ChannelPad",
    "FirstChannels",
    "GroupSort",
    "HouseholderActivation",
    "InvertibleDownsample",
    "LBDN",
    "LLNLinear",
    "ManifoldPool",
    "MaxMin",
    "MLPHead",
    "Normalize",
    "OneLipschitz",
    "OrthogonalLinear",
    "PairMaxPool",
    "SandwichConv2d",
    "SandwichLinear",
    "SandwichOutput",
    "Scale",
    "SOCConv2d",
    "SpatialPad",
]
