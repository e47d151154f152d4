"""Figures for the counterfactual evaluation (LDS per step, top-k retraining, feature formation,
lambda sweep).

matplotlib is imported lazily inside each function and drawn with the Agg canvas directly
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), never through pyplot, so no global backend is
touched. Every function saves a PNG and returns :class:`Plot`: the path and the same figure as a
``(3, H, W)`` uint8 tensor, ready for ``SummaryWriter.add_image``. NaN values are drawn as gaps.

Legible with many series: every figure is laid out by matplotlib's constrained layout at a fixed size
(``FIGSIZE``), the legend sits outside the axes on the right (more columns when it is long), a long title
is wrapped until it fits inside the figure, and series i gets a (color, marker, line style) combination of
its own (:func:`series_style`: 10 colors, then new markers and dashes), so 8-12 methods stay apart.
"""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write

__all__ = ["Plot", "plot_lds_vs_step", "plot_counterfactual_bars", "plot_feature_formation", "plot_lambda_sweep",
           "series_style", "FIGSIZE", "DPI"]

PathLike = Union[str, Path]
Array = Union[Tensor, np.ndarray, Sequence]

FIGSIZE, DPI = (8.0, 4.5), 100           # inches; the PNG and the image are FIGSIZE x DPI pixels
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")                       # matplotlib's tab10
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_LINESTYLES = ("-", "--", "-.", ":")
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo")
_LEGEND_ROWS = 16                          # legend entries per column before another column is added
_TITLE_WIDTHS = (60, 48, 36, 24)           # characters per title line, tried in turn until the title fits


class Plot(NamedTuple):
    """A saved figure: ``path`` of the PNG, ``image (3, H, W)`` uint8 and the drawn matplotlib ``figure``
    (its artists' extents can be read with ``figure.canvas.get_renderer()``)."""

    path: Path
    image: Tensor
    figure: Any = None


def series_style(i: int) -> dict:
    """Line style of series ``i``: a color of tab10, a marker and a line style, distinct for the first 40 series
    (colors cycle every 10, markers every 12, a new line style every 10)."""
    return {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[(i // len(_COLORS)) % len(_LINESTYLES)]}


def _bar_style(i: int) -> dict:
    """Bar style of series ``i``: a tab10 color, then a hatch pattern of its own for every further 10."""
    return {"color": _COLORS[i % len(_COLORS)], "hatch": _HATCHES[(i // len(_COLORS)) % len(_HATCHES)],
            "edgecolor": "white" if i < len(_COLORS) else "black", "linewidth": 0.5}


def _figure(figsize=FIGSIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _legend(ax, handles: Optional[list] = None) -> None:
    """The legend of ``handles`` (default: every labelled artist) outside the axes, to the right (top-aligned);
    a long one in several columns."""
    handles = ax.get_legend_handles_labels()[0] if handles is None else handles
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize="small", ncol=max(1, math.ceil(len(handles) / _LEGEND_ROWS)))


def _inside(inner, outer, slack: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack and inner.x1 <= outer.x1 + slack
            and inner.y1 <= outer.y1 + slack)


def _set_title(fig, ax, title: str) -> None:
    """``title`` above ``ax``, wrapped to fewer characters per line until the drawn title lies inside the figure."""
    for width in _TITLE_WIDTHS:
        ax.set_title(textwrap.fill(title, width, break_long_words=True))
        fig.canvas.draw()
        if _inside(ax.title.get_window_extent(fig.canvas.get_renderer()), fig.bbox):
            return


def _finish(fig, path: PathLike, title: Optional[str] = None) -> Plot:
    path = Path(path)
    ax = fig.axes[0]
    if title is not None:
        _set_title(fig, ax, title)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    image = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()
    return Plot(path, image, fig)


def _array(name: str, value: Array, ndim: Sequence[int]) -> np.ndarray:
    a = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else np.asarray(value, dtype=np.float64)
    if a.ndim not in ndim:
        raise ValueError(f"Expected `{name}` with {' or '.join(map(str, ndim))} dimensions, but got shape {a.shape}")
    return a


def _need(rows: Sequence[Mapping], keys: Sequence[str], name: str) -> None:
    if not rows:
        raise ValueError(f"Expected `{name}` to hold at least one row, but got none")
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"Expected every row of `{name}` to have keys {list(keys)}, but a row lacks {missing}: {r}")


def _f(v) -> float:
    return math.nan if v is None else float(v)


def plot_lds_vs_step(table_rows: Sequence[Mapping], path: PathLike, title: str = "LDS per step") -> Plot:
    """One line per method (``lds_mean`` with error bars: ``lds_se_total``, the s.e. over targets and subset
    models, where the rows give a finite one, else ``lds_se``) against the step t, and the seed-noise
    ``ceiling`` (dashed) where the rows give a finite one.

    Args:
        table_rows: rows of :func:`attribution.lds.lds_table` (keys ``method, step, lds_mean, lds_se``,
            optional ``ceiling``).
        path: where to save the PNG.
    """
    _need(table_rows, ("method", "step", "lds_mean", "lds_se"), "table_rows")
    by_method, ceiling = defaultdict(list), {}
    for r in table_rows:
        total = _f(r.get("lds_se_total"))
        by_method[r["method"]].append((int(r["step"]), _f(r["lds_mean"]), total if math.isfinite(total) else _f(r["lds_se"])))
        c = _f(r.get("ceiling"))
        if math.isfinite(c):
            ceiling.setdefault(int(r["step"]), c)
    fig, ax = _figure()
    handles = []
    for i, (method, pts) in enumerate(by_method.items()):
        t, m, se = map(np.array, zip(*sorted(pts)))
        handles.append(ax.errorbar(t, m, yerr=np.nan_to_num(se), capsize=3, markersize=5, label=str(method),
                                   **series_style(i)))
    if ceiling:
        t = sorted(ceiling)
        handles += ax.plot(t, [ceiling[s] for s in t], color="k", ls=(0, (6, 3)), lw=1.8, label="seed-noise ceiling")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("step t (noise decreases to the right)")
    ax.set_ylabel("LDS (Spearman with -f_t), mean ± s.e.")
    _legend(ax, handles)
    return _finish(fig, path, title)


def plot_counterfactual_bars(rows: Sequence[Mapping], path: PathLike, metric: str = "FID",
                             title: Optional[str] = None) -> Plot:
    """Grouped bars: one group per k, one bar per method, height ``value`` with ``se`` error bars.

    Args:
        rows: dicts with keys ``method``, ``k``, ``value`` and optional ``se`` (e.g. FID or L2 distance
            after retraining without the top-k examples).
        metric: y-axis label.
    """
    _need(rows, ("method", "k", "value"), "rows")
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    ks = sorted({int(r["k"]) for r in rows})
    cell = {(str(r["method"]), int(r["k"])): (_f(r["value"]), _f(r.get("se"))) for r in rows}
    fig, ax = _figure()
    width = 0.8 / len(methods)
    x = np.arange(len(ks))
    for i, method in enumerate(methods):
        vals = np.array([cell.get((method, k), (math.nan, math.nan)) for k in ks])
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(vals[:, 0]), width,
               yerr=np.nan_to_num(vals[:, 1]), capsize=max(1.0, 3.0 * min(1.0, 4 / len(methods))), label=method,
               **_bar_style(i))
    ax.set_xticks(x, [f"k = {k}" for k in ks])
    ax.set_ylabel(metric)
    _legend(ax)
    return _finish(fig, path, title or f"{metric} after removing the top-k examples")


def plot_feature_formation(steps: Array, fractions: Array, path: PathLike,
                           labels: Optional[Sequence[str]] = None, title: str = "Feature formation") -> Plot:
    """Fraction of completions from ``x_t`` classified as the final image's class, per step.

    Args:
        steps: ``(S,)`` step values t.
        fractions: ``(B, S)`` (one row per target) or ``(S,)``; values in [0, 1], NaN = not measured.
        labels: optional B line labels.
    """
    t = _array("steps", steps, (1,))
    frac = _array("fractions", fractions, (1, 2))
    frac = frac[None] if frac.ndim == 1 else frac
    if frac.shape[1] != t.size:
        raise ValueError(f"Expected `fractions` of shape (B, {t.size}) to match `steps`, but got {frac.shape}")
    if labels is not None and len(labels) != frac.shape[0]:
        raise ValueError(f"Expected {frac.shape[0]} `labels`, but got {len(labels)}")
    fig, ax = _figure()
    order = np.argsort(t)
    for b, row in enumerate(frac):
        ax.plot(t[order], row[order], alpha=0.7, markersize=4, label=None if labels is None else labels[b],
                **series_style(b))
    if frac.shape[0] > 1:
        with np.errstate(all="ignore"):
            ax.plot(t[order], np.nanmean(frac, 0)[order], "k-", lw=2.5, label="mean")
    ax.invert_xaxis()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step t (noise decreases to the right)")
    ax.set_ylabel("fraction of completions in the final class")
    _legend(ax)
    return _finish(fig, path, title)


def plot_lambda_sweep(lambdas: Array, lds_mean: Array, path: PathLike, steps: Optional[Sequence[int]] = None,
                      chosen: Optional[Array] = None, title: str = "LDS against the ridge lambda") -> Plot:
    """Mean LDS against lambda (log x axis; symlog when a lambda is 0), one line per step.

    Args:
        lambdas: ``(L,)`` candidate values (>= 0).
        lds_mean: ``(L,)`` or ``(L, S)`` mean LDS (e.g. ``LambdaChoice.heldout_mean``).
        steps: optional S step values for the legend.
        chosen: optional lambda(s) marked with vertical dotted lines (e.g. ``LambdaChoice.chosen_lambda``).
    """
    lam = _array("lambdas", lambdas, (1,))
    y = _array("lds_mean", lds_mean, (1, 2))
    y = y[:, None] if y.ndim == 1 else y
    if y.shape[0] != lam.size:
        raise ValueError(f"Expected `lds_mean` with L = {lam.size} rows like `lambdas`, but got shape {y.shape}")
    if steps is not None and len(steps) != y.shape[1]:
        raise ValueError(f"Expected {y.shape[1]} `steps`, but got {len(steps)}")
    fig, ax = _figure()
    order = np.argsort(lam)
    for s in range(y.shape[1]):
        label = f"t = {steps[s]}" if steps is not None else (None if y.shape[1] == 1 else f"step {s}")
        ax.plot(lam[order], y[order, s], markersize=5, label=label, **series_style(s))
    positive = lam[lam > 0]
    if (lam <= 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
    else:
        ax.set_xscale("log")
    for c in np.unique(_array("chosen", chosen, (0, 1))) if chosen is not None else []:
        if math.isfinite(c):
            ax.axvline(c, color="0.4", ls=":", lw=1)
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel("ridge lambda")
    ax.set_ylabel("mean LDS")
    _legend(ax)
    return _finish(fig, path, title)
