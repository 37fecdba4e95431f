"""Linear probe on frozen image features, CLIP's protocol (docs/methods.md "CLIP").

Logistic regression with L-BFGS and at most 1,000 iterations; the inverse regularisation strength C is
chosen by validation accuracy over a log-spaced grid, then the probe is refit on train + val with that C and
scored once on test. CLIP searches C in [1e-6, 1e6]; the default grid covers that range at one point per
decade (a grid instead of CLIP's parametric binary search, so the search is deterministic and cheap).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))
MAX_ITER_LIMIT = 1000  # L-BFGS, at most 1,000 iterations


def _as_arrays(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float64)
    y = np.asarray(y.cpu() if hasattr(y, "cpu") else y).reshape(-1)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name}: features must be a non-empty [n, d] array with one label each, "
                         f"got x {x.shape} and y {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf values")
    return x, y


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    classifier = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    # The iteration cap is part of the protocol; at the weakly regularised end of the grid L-BFGS often
    # stops at the cap, which is expected and not worth a warning per fit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return classifier.fit(x, y)


def _accuracy(classifier: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float(np.mean(classifier.predict(x) == y))


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, Cs: Sequence[float] | None = None,
                 max_iter: int = MAX_ITER_LIMIT) -> dict[str, float]:
    """Fit the CLIP linear probe and return `top1` (test, percent), the chosen `C` and its `val_top1`.

    The C with the highest validation accuracy wins; on a tie the smallest such C (strongest
    regularisation) is taken. Features are used as given (no standardisation, as in CLIP).
    """
    if not 1 <= max_iter <= MAX_ITER_LIMIT:
        raise ValueError(f"max_iter must be in [1, {MAX_ITER_LIMIT}] (CLIP's linear-probe protocol caps L-BFGS "
                         f"at 1,000 iterations), got {max_iter}")
    cs = sorted(float(c) for c in (DEFAULT_CS if Cs is None else Cs))
    if not cs or min(cs) <= 0:
        raise ValueError(f"Cs must be a non-empty list of positive values, got {Cs}")
    train_x, train_y = _as_arrays(train_x, train_y, "train")
    val_x, val_y = _as_arrays(val_x, val_y, "val")
    test_x, test_y = _as_arrays(test_x, test_y, "test")
    if len(np.unique(train_y)) < 2:
        raise ValueError("train: the linear probe needs at least two classes in train_y")

    val_scores = [_accuracy(_fit(train_x, train_y, c, max_iter), val_x, val_y) for c in cs]
    best = int(np.argmax(val_scores))  # argmax returns the first maximum = the smallest C on ties
    final = _fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), cs[best], max_iter)
    return {"top1": _accuracy(final, test_x, test_y), "C": cs[best], "val_top1": val_scores[best]}
