"""Datasets: 2-D toy densities, irregularly sampled spirals, and 8×8 digits."""

from ._digits import Digits as Digits, digits as digits
from ._spiral import SpiralData as SpiralData, spiral as spiral
from ._toy import (
    TOY_2D_NAMES as TOY_2D_NAMES,
    toy_2d as toy_2d,
    toy_2d_entropy as toy_2d_entropy,
    toy_2d_log_density as toy_2d_log_density,
)
