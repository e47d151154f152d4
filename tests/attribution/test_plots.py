"""Plots: each writes a PNG of the expected size, returns a matching (3, H, W) image, survives NaNs; with 10
methods the legend lies outside the axes and inside the figure, a long title is wrapped inside the figure, and
every series is drawn in a style of its own."""
import math
import struct
import subprocess
import sys

import pytest
import torch

from attribution.plots import (DPI, FIGSIZE, plot_counterfactual_bars, plot_feature_formation, plot_lambda_sweep,
                               plot_lds_vs_step)

W, H = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
LONG_TITLE = ("trak@layerwise_ensemble_of_four_checkpoints: held-out LDS per step against the ridge lambda, "
              "report targets only, lambda chosen on the held-out half")
METHODS = ["trak", "trak_1ckpt", "trak_square", "trak@gaussian", "trak@layerwise", "dtrak_l2", "ekfac",
           "pixel", "embedding", "random"]


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


def _check_legible(plot, n_series):
    """Legend right of the axes (no overlap) and inside the figure; title inside the figure; distinct styles."""
    fig = plot.figure
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend, frame = ax.get_legend(), fig.bbox
    assert legend is not None and len(legend.get_texts()) >= n_series
    box, axes_box, title = (legend.get_window_extent(renderer), ax.get_window_extent(renderer),
                            ax.title.get_window_extent(renderer))
    assert box.x0 >= axes_box.x1, (box, axes_box)                    # outside the axes, to the right
    for inner in (box, title, axes_box):                             # nothing clipped by the figure's edge
        assert frame.x0 <= inner.x0 and inner.x1 <= frame.x1 and frame.y0 <= inner.y0 and inner.y1 <= frame.y1, \
            (inner, frame)
    assert title.y0 >= axes_box.y1 - 1                               # the title above the axes, not over them
    return ax, legend


def _line_styles(ax):
    """(color, marker, line style) of each legend entry's line (an error-bar series: its data line)."""
    lines = [h[0] if isinstance(h, tuple) else h for h in ax.get_legend_handles_labels()[0]]
    return [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines]


def test_ten_methods_lds_vs_step_is_legible(tmp_path):
    rows = [{"method": m, "step": t, "lds_mean": 0.01 * i + t / 5000, "lds_se": 0.02, "ceiling": 0.5}
            for i, m in enumerate(METHODS) for t in (900, 700, 500, 300, 100)]
    plot = plot_lds_vs_step(rows, tmp_path / "lds.png", title=LONG_TITLE)
    _check(plot, tmp_path / "lds.png")
    ax, legend = _check_legible(plot, len(METHODS) + 1)
    assert "\n" in ax.get_title()                                    # the long title was wrapped
    assert [t.get_text() for t in legend.get_texts()] == METHODS + ["seed-noise ceiling"]
    styles = _line_styles(ax)
    assert len(styles) == len(METHODS) + 1 and len(set(styles)) == len(styles)


def test_ten_methods_counterfactual_bars_are_legible(tmp_path):
    rows = [{"method": m, "k": k, "value": 1.0 + i + k / 100, "se": 0.1} for i, m in enumerate(METHODS)
            for k in (36, 180)]
    plot = plot_counterfactual_bars(rows, tmp_path / "bars.png", metric="completion_l2", title=LONG_TITLE)
    _check(plot, tmp_path / "bars.png")
    ax, legend = _check_legible(plot, len(METHODS))
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert [c.get_label() for c in bars] == METHODS
    assert len({tuple(c.patches[0].get_facecolor()) for c in bars}) == len(METHODS)


def test_twelve_steps_lambda_sweep_and_twelve_targets_formation_are_legible(tmp_path):
    steps = list(range(1100, -1, -100))
    lds = torch.rand(4, len(steps), generator=torch.Generator().manual_seed(0))
    plot = plot_lambda_sweep([1e-2, 1e-1, 1.0, 10.0], lds, tmp_path / "sweep.png", steps=steps, title=LONG_TITLE)
    _check(plot, tmp_path / "sweep.png")
    ax, _ = _check_legible(plot, len(steps))
    assert len(set(_line_styles(ax))) == len(steps)
    fractions = torch.rand(12, len(steps), generator=torch.Generator().manual_seed(1))
    plot = plot_feature_formation(steps, fractions, tmp_path / "ff.png", labels=[f"target {b}" for b in range(12)],
                                  title=LONG_TITLE)
    _check(plot, tmp_path / "ff.png")
    ax, _ = _check_legible(plot, 13)
    assert len(set(_line_styles(ax))) == 13
