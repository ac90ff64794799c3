"""The Mauna Loa weekly CO₂ record shipped with statsmodels, cut into windows.

`statsmodels.datasets.co2` holds the weekly mean CO₂ mole fraction (ppm) at
Mauna Loa from March 1958 to December 2001, 2284 weeks of which 59 have no
measurement: a real series with a trend, a yearly cycle and gaps, the setting
of latent ODEs for irregularly sampled series (Rubanova, Chen, Duvenaud 2019).

**References:**

- Keeling, Whorf. "Atmospheric CO2 records from sites in the SIO air sampling
  network." Trends: A Compendium of Data on Global Change, CDIAC, 2004 (the
  statsmodels dataset).
- Rubanova, Chen, Duvenaud. "Latent ODEs for Irregularly-Sampled Time
  Series." NeurIPS 2019.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

WEEK_IN_YEARS = 7 / 365.25
"""The spacing of the series' weekly grid, in years."""


class CO2Series(NamedTuple):
    """The whole weekly record returned by [`mauna_loa_co2`][]; NumPy arrays.

    - `year`: (n,) float64 decimal year of each week (the week's Saturday),
      strictly increasing by 7 days.
    - `ppm`: (n,) float64 CO₂ in ppm, NaN for a week without a measurement.
    """

    year: Float[np.ndarray, " n"]
    ppm: Float[np.ndarray, " n"]


@functools.cache
def _load() -> CO2Series:
    try:
        from statsmodels.datasets import co2
    except ImportError as e:
        raise ImportError(
            "neuralode.datasets.mauna_loa_co2 needs statsmodels (it ships the "
            "data): pip install 'neuralode[experiments]'"
        ) from e

    frame: Any = co2.load_pandas().data  # a pandas DataFrame
    dates = frame.index
    start = np.datetime64(f"{dates[0].year}-01-01")
    days = (dates.values.astype("datetime64[D]") - start).astype(np.float64)
    year = dates[0].year + days / 365.25
    ppm = frame["co2"].to_numpy(np.float64)
    year.flags.writeable = False
    ppm.flags.writeable = False
    return CO2Series(year, ppm)


def mauna_loa_co2() -> CO2Series:
    """Load the Mauna Loa weekly CO₂ record (1958–2001) shipped with statsmodels.

    No network access: the data are a file inside the statsmodels package.

    **Returns:**

    A [`CO2Series`][] of 2284 weeks, 59 of them NaN (no measurement).
    """
    return _load()


class CO2Windows(NamedTuple):
    """Windows of consecutive weeks cut by [`co2_windows`][]; NumPy arrays.

    With N windows of W weeks:

    - `t`: (W,) float64 time since the window's first week, in years (the same
      for every window: `arange(W) * WEEK_IN_YEARS`).
    - `ppm`: (N, W) float64 CO₂, 0 where there is no measurement.
    - `measured`: (N, W) bool, whether the week has a measurement.
    - `start`: (N,) int64 index of each window's first week in the series.
    - `start_year`: (N,) float64 decimal year of each window's first week.
    """

    t: Float[np.ndarray, " W"]
    ppm: Float[np.ndarray, "N W"]
    measured: Bool[np.ndarray, "N W"]
    start: Int[np.ndarray, " N"]
    start_year: Float[np.ndarray, " N"]


def co2_windows(series: CO2Series, starts, length: int) -> CO2Windows:
    """Cut windows of `length` consecutive weeks starting at the indices `starts`.

    **Arguments:**

    - `series`: the record, from [`mauna_loa_co2`][].
    - `starts`: indices of the first week of each window.
    - `length`: weeks per window, at least 2.

    **Returns:**

    A [`CO2Windows`][].

    **Raises:**

    `ValueError` for `length < 2` or a window that does not fit in the series.
    """
    starts = np.asarray(starts, np.int64).reshape(-1)
    n = len(series.year)
    if length < 2:
        raise ValueError(f"length must be at least 2 weeks, got {length}.")
    bad = starts[(starts < 0) | (starts + length > n)]
    if bad.size:
        raise ValueError(
            f"a window of {length} weeks starting at index {int(bad[0])} does not "
            f"fit in the series of {n} weeks."
        )
    idx = starts[:, None] + np.arange(length)
    ppm = series.ppm[idx]
    measured = ~np.isnan(ppm)
    return CO2Windows(
        np.arange(length) * WEEK_IN_YEARS,
        np.where(measured, ppm, 0.0),
        measured,
        starts,
        series.year[starts],
    )


def week_of_year(series: CO2Series, year: float) -> int:
    """The index of the first week at or after the decimal `year`.

    **Raises:** `ValueError` for a year after the last week.
    """
    i = int(np.searchsorted(series.year, year))
    if i >= len(series.year):
        raise ValueError(
            f"year {year} is after the last week of the series ({series.year[-1]:.3f})."
        )
    return i
