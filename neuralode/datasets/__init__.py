"""Datasets: 2-D toy densities, irregularly sampled spirals, 8×8 digits, and
classic stiff systems (Robertson, Van der Pol, HIRES, OREGO)."""

from ._digits import Digits as Digits, digits as digits
from ._spiral import SpiralData as SpiralData, spiral as spiral
from ._stiff_systems import (
    STIFF_SYSTEM_NAMES as STIFF_SYSTEM_NAMES,
    StiffSystem as StiffSystem,
    stiff_system as stiff_system,
)
from ._toy import (
    TOY_2D_NAMES as TOY_2D_NAMES,
    toy_2d as toy_2d,
    toy_2d_entropy as toy_2d_entropy,
    toy_2d_log_density as toy_2d_log_density,
)
