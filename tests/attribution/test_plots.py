"""Plots: each writes a PNG of the expected size, returns a matching (3, H, W) image, survives NaNs."""
import math
import struct
import subprocess
import sys

import pytest
import torch

from attribution.plots import plot_counterfactual_bars, plot_feature_formation, plot_lambda_sweep, plot_lds_vs_step

W, H = 600, 400        # figsize (6, 4) at 100 dpi


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert 5_000 < len(data) < 500_000, len(data)
    return struct.unpack(">II", data[16:24])


def _check(plot, path):
    assert plot.path == path
    assert _png_size(path) == (W, H)
    assert plot.image.shape == (3, H, W) and plot.image.dtype == torch.uint8
    assert plot.image.float().std() > 5          # not a blank canvas


def _rows():
    rows = []
    for method, base in (("trak", 0.2), ("pixel", 0.0)):
        for t, c in ((900, 0.3), (500, 0.45), (100, 0.65)):
            rows.append({"method": method, "step": t, "lds_mean": base + t / 5000, "lds_se": 0.03, "ceiling": c,
                         "n_targets": 8})
    return rows


def test_lds_vs_step(tmp_path):
    _check(plot_lds_vs_step(_rows(), tmp_path / "lds.png"), tmp_path / "lds.png")


def test_lds_vs_step_with_nans_and_no_ceiling(tmp_path):
    rows = _rows()
    rows[1]["lds_mean"] = math.nan
    rows[2]["lds_se"] = None
    for r in rows:
        r["ceiling"] = math.nan
    _check(plot_lds_vs_step(rows, tmp_path / "a" / "lds.png"), tmp_path / "a" / "lds.png")


def test_lds_vs_step_rejects_rows_without_keys(tmp_path):
    with pytest.raises(ValueError, match="`table_rows`.*lds_se"):
        plot_lds_vs_step([{"method": "x", "step": 1, "lds_mean": 0.1}], tmp_path / "x.png")


def test_counterfactual_bars_with_missing_cells_and_nan(tmp_path):
    rows = [{"method": m, "k": k, "value": v, "se": 1.0} for m, v in (("trak", 30.0), ("pixel", 12.0), ("random", 3.0))
            for k in (200, 500, 1000)]
    rows[0]["value"] = math.nan
    rows.pop()                                     # a missing (method, k) cell
    _check(plot_counterfactual_bars(rows, tmp_path / "bars.png"), tmp_path / "bars.png")


def test_feature_formation(tmp_path):
    steps = torch.arange(1000, -1, -100)
    fractions = torch.sigmoid((500 - steps.float()) / 60).repeat(4, 1)
    fractions[1, 3] = math.nan
    _check(plot_feature_formation(steps, fractions, tmp_path / "ff.png"), tmp_path / "ff.png")
    with pytest.raises(ValueError, match="`fractions`.*\\(B, 11\\)"):
        plot_feature_formation(steps, fractions[:, :5], tmp_path / "bad.png")


def test_lambda_sweep_per_step_with_zero_lambda_and_nan(tmp_path):
    lambdas = torch.tensor([0.0, 1e-3, 1e-2, 1e-1, 1.0])
    lds = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    lds[2, 1] = math.nan
    _check(plot_lambda_sweep(lambdas, lds, tmp_path / "sweep.png", steps=[900, 500, 100], chosen=torch.tensor([0.1] * 3)),
           tmp_path / "sweep.png")
    _check(plot_lambda_sweep([1e-2, 1e-1, 1.0], [0.1, 0.2, math.nan], tmp_path / "sweep1.png"), tmp_path / "sweep1.png")


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, attribution.plots, attribution.lds, attribution.baselines; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
