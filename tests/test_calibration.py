"""Calibration metrics (DeepSpec binning) and Sequential Temperature Scaling."""

import numpy as np
import pytest

from dspark_jax.scheduling import (DEFAULT_STS_GRID, auroc, brier, calibration_report, ece,
                                   fit_sts, prefix_labels, reliability_diagram)

TRUE_T = np.array([1.5, 0.8, 2.0, 1.2])


def _synthetic(n, seed, temps=TRUE_T, loc=5.0, scale=3.0):
  """Logits and realised prefix bits whose true conditionals are sigmoid(z_k / T_k)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(loc, scale, (n, len(temps)))
  conditional = 1.0 / (1.0 + np.exp(-z / temps))
  return z, np.cumprod(rng.random(z.shape) < conditional, axis=1)  # Bernoulli chains


def test_ece_hand_examples():
  # bins 2 (p = 0.1) and 18 (p = 0.9): 2/4 * |0.1 - 0.5| + 2/4 * |0.9 - 1|
  assert ece(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1])) == pytest.approx(0.25)
  # equal-width edges: 0.049 is in bin 0, 0.05 in bin 1 (floor(20 p))
  assert ece(np.array([0.049, 0.05]), np.array([0, 1])) == pytest.approx((0.049 + 0.95) / 2)
  # clipping to [1e-8, 1 - 1e-8]; p = 1 lands in the last bin
  assert ece(np.array([0.0, 1.0]), np.array([0, 1])) == pytest.approx(1e-8, abs=1e-15)
  assert ece(np.array([0.96, 1.0]), np.array([1, 1])) == pytest.approx((0.04 + 1e-8) / 2)
  assert ece(np.array([0.2, 0.4]), np.array([0, 0]), bins=2) == pytest.approx(0.3)
  assert np.isnan(ece(np.zeros(0), np.zeros(0)))


def test_auroc_hand_examples():
  assert auroc(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 1, 0, 1])) == pytest.approx(0.75)
  assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == pytest.approx(1.0)
  assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
  # ordered but inside one of the 1000 fine bins: counted as 1/2
  assert auroc(np.array([0.5001, 0.5004]), np.array([0, 1])) == pytest.approx(0.5)
  assert auroc(np.array([0.5001, 0.5004]), np.array([0, 1]), fine_bins=10000) == 1.0
  assert np.isnan(auroc(np.array([0.3, 0.4]), np.array([1, 1])))


def test_brier_hand_example():
  assert brier(np.array([0.2, 0.9]), np.array([0, 1])) == pytest.approx(0.025)
  assert brier(np.array([1.0]), np.array([0])) == pytest.approx((1 - 1e-8) ** 2)


def test_prefix_labels():
  labels, valid = prefix_labels(np.array([0, 2, 3, 1]), np.array([3, 3, 3, 1]), 4)
  assert labels.astype(int).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
  assert valid.astype(int).tolist() == [[1, 1, 1, 0]] * 3 + [[1, 0, 0, 0]]
  labels, valid = prefix_labels([2], None, 3)
  assert labels.tolist() == [[True, True, False]] and valid.all()
  with pytest.raises(ValueError, match="accepted <= n_eff"):
    prefix_labels(np.array([3]), np.array([2]), 4)


def test_default_grid():
  assert DEFAULT_STS_GRID.size == 451 and 1.0 in DEFAULT_STS_GRID
  assert DEFAULT_STS_GRID[0] == 0.5 and DEFAULT_STS_GRID[-1] == 5.0


def test_sts_recovers_temperatures_and_lowers_ece():
  z, y = _synthetic(40_000, seed=0)
  temps = fit_sts(z, y)
  assert temps.dtype == np.float64 and temps.shape == (4,)
  np.testing.assert_allclose(temps, TRUE_T, atol=0.1)
  z_test, y_test = _synthetic(20_000, seed=1)  # report on a disjoint split
  raw = calibration_report(z_test, y_test)
  sts = calibration_report(z_test, y_test, temps)
  assert sum(sts["ece"]) < 0.5 * sum(raw["ece"]), (raw["ece"], sts["ece"])
  assert sts["summary"]["ece"] < raw["summary"]["ece"]
  assert abs(sts["auroc"][0] - raw["auroc"][0]) < 0.01  # one temperature barely re-ranks


def test_sts_uses_only_valid_rows():
  z, y = _synthetic(4_000, seed=2)
  n_eff = np.random.default_rng(3).integers(1, 5, len(z))
  accepted = np.minimum(y.sum(axis=1), n_eff)
  labels, valid = prefix_labels(accepted, n_eff, 4)
  garbage = np.where(valid, labels, 1 - labels)  # unobserved positions must not matter
  grid = np.round(np.arange(50, 301, 5) / 100.0, 2)
  np.testing.assert_array_equal(fit_sts(z, labels, grid=grid, valid=valid),
                                fit_sts(z, garbage, grid=grid, valid=valid))


def test_sts_ties_take_first_grid_value_and_warn_on_edge():
  z = np.zeros((100, 2))  # sigmoid(0 / T) = 0.5 for every T: all errors equal
  y = np.cumprod(np.random.default_rng(4).random((100, 2)) < 0.5, axis=1)
  with pytest.warns(UserWarning, match="grid edge"):
    temps = fit_sts(z, y, grid=[2.0, 1.0, 3.0])
  assert temps.tolist() == [1.0, 1.0]  # the smallest grid value (the grid is sorted)
  z, y = _synthetic(2_000, seed=5, temps=np.array([8.0]), loc=0.0, scale=10.0)
  with pytest.warns(UserWarning, match="widen the grid"):
    assert fit_sts(z, y, grid=[0.5, 1.0, 2.0]).tolist() == [2.0]


def test_calibration_report_shapes():
  z, y = _synthetic(3_000, seed=6)
  valid = np.arange(4)[None, :] < np.random.default_rng(7).integers(1, 5, len(z))[:, None]
  report = calibration_report(z, y, np.ones(4), valid=valid)
  assert set(report) == {"ece", "auroc", "brier", "count", "summary"}
  assert set(report["summary"]) == {"ece", "auroc", "brier"}
  for name in ("ece", "auroc", "brier", "count"):
    assert len(report[name]) == 4
  assert report["count"] == valid.sum(axis=0).tolist()
  weights = np.array(report["count"]) / valid.sum()
  assert report["summary"]["ece"] == pytest.approx(np.dot(weights, report["ece"]))
  assert report == calibration_report(z, y, valid=valid)  # T = 1 is the raw head


def test_reliability_diagram_writes_png(tmp_path):
  z, y = _synthetic(2_000, seed=8)
  path = reliability_diagram(z, y, TRUE_T, tmp_path / "fig6.png", positions=[0, 2])
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
