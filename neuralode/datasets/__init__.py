"""Datasets: 2-D toy densities, irregularly sampled spirals, 8×8 digits (as
classes or as images), the Mauna Loa CO₂ record, and classic stiff systems
(Robertson, Van der Pol, HIRES, OREGO)."""

from ._co2 import (
    WEEK_IN_YEARS as WEEK_IN_YEARS,
    CO2Series as CO2Series,
    CO2Windows as CO2Windows,
    co2_windows as co2_windows,
    mauna_loa_co2 as mauna_loa_co2,
    week_of_year as week_of_year,
)
from ._digit_images import (
    DIGIT_LEVELS as DIGIT_LEVELS,
    DigitImages as DigitImages,
    bits_per_dim as bits_per_dim,
    dequantize as dequantize,
    digit_images as digit_images,
    logit_transform as logit_transform,
)
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
