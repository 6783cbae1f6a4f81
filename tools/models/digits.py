"""The sklearn digits split shared by every model trained on digits."""

from __future__ import annotations

import numpy as np

from .common import SEED

DIGITS_TEST_FRACTION = 0.25
DIGITS_N_SAVED = 100  # held-out images written to models/digits_test.npz


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits scaled to [0,1], shape [N,1,8,8], stratified seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def normalization(x_tr: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the training pixels (the models' first Sub/Div)."""
    return float(x_tr.mean()), float(x_tr.std())
