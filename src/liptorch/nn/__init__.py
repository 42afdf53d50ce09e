"""Lipschitz-constrained layers.  Each layer family lives in its own file."""
from .base import LipschitzModule
from .normalize import Normalize, Scale
from .simple import ChannelPad, FirstChannels, GroupSort, InvertibleDownsample, MaxMin, OneLipschitz

__all__ = [
    "LipschitzModule",
    "Normalize",
    "Scale",
    "ChannelPad",
    "FirstChannels",
    "GroupSort",
    "InvertibleDownsample",
    "MaxMin",
    "OneLipschitz",
]
