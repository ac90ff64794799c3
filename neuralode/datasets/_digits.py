"""The 8×8 handwritten digits shipped with scikit-learn, split for training."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float32, Int32


class Digits(NamedTuple):
    """Train/test split returned by [`digits`][]; NumPy arrays.

    - `x_train`: (n_train, 64) float32 pixel intensities in [0, 1].
    - `y_train`: (n_train,) int32 labels in 0..9.
    - `x_test`: (n_test, 64) float32.
    - `y_test`: (n_test,) int32.
    """

    x_train: Float32[np.ndarray, "n_train 64"]
    y_train: Int32[np.ndarray, " n_train"]
    x_test: Float32[np.ndarray, "n_test 64"]
    y_test: Int32[np.ndarray, " n_test"]


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "neuralode.datasets.digits needs scikit-learn (it ships the data): "
            "pip install 'neuralode[experiments]'"
        ) from e

    data: Any = load_digits()  # a Bunch (return_X_y=False)
    x = (np.asarray(data.data, np.float64) / 16.0).astype(np.float32)
    y = np.asarray(data.target).astype(np.int32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Load scikit-learn's 8×8 digits, scaled to [0, 1], with a stratified split.

    The data are the 1797 images of the UCI optical-recognition digits shipped
    with scikit-learn (`sklearn.datasets.load_digits`, no download). Each pixel is
    a count in 0..16 and is divided by 16. The split is stratified by class with
    `sklearn.model_selection.train_test_split` seeded by `seed`, so each class has
    the same share `test_fraction` of the test set (up to rounding) and the split
    is the same on every call with the same arguments.

    **Arguments:**

    - `test_fraction`: fraction of the images in the test set, in (0, 1).
    - `seed`: seed of the split.

    **Returns:**

    A [`Digits`][] `(x_train, y_train, x_test, y_test)` of NumPy arrays, x of
    shape (n, 64) and dtype float32, y of shape (n,) and dtype int32; with the
    default fraction n_test = 360 and n_train = 1437.

    **References:**

    Alpaydin, Kaynak. "Optical Recognition of Handwritten Digits." UCI Machine
    Learning Repository, 1998.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    x, y = _load()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Digits(
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )
