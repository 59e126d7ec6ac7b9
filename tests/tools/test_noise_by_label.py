"""tools/noise_by_label.py: the signals against a hand computation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from noise_by_label import signals  # noqa: E402


def test_signals_by_hand():
    S = np.array([[1.0, 2.0, 3.0, 10.0], [5.0, 6.0, 7.0, 0.0]])  # valuation rows of labels a, b
    got = signals(S, ["a", "b"], ["a", "a", "b", "b"])
    np.testing.assert_allclose(got["mean"], [3.0, 4.0, 5.0, 5.0])
    np.testing.assert_allclose(got["own_label"], [1.0, 2.0, 7.0, 0.0])
    np.testing.assert_allclose(got["own_label_centered"], [-0.5, 0.5, 3.5, -3.5])
