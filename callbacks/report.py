"""Pictures a person looks at: per target, x0_hat_t across steps with the top positive (green) and
top negative (red) training images under each step (like Figure 1 of the paper), and an index page."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from attribution.atomic import atomic_write, atomic_write_text

GREEN, RED = "#1a9850", "#d73027"


def _show(ax, image: torch.Tensor, color: Optional[str] = None, title: Optional[str] = None) -> None:
    """Draw a (C,H,W) image in [-1, 1]; a coloured frame when ``color`` is given."""
    img = ((image.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_edgecolor(color)
            spine.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=7, pad=2)


def influencer_figure(trajectory: Any, result: dict, images: Callable, path: str | Path, k: int = 4,
                      logger: Any = None) -> Path:
    """Write the picture of one target and return its path.

    Args:
        trajectory: the target (``x0_hat`` (S, C, H, W) at ``timesteps``; ``final``).
        result: the target's scores: ``timesteps`` (S',), ``positive_indices``/``values`` (k', S'), negatives.
        images: global indices -> training images (n, C, H, W) in [-1, 1] (a datamodule's ``images``).
        k: influencers shown per sign and step.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["timesteps"].tolist()
    x0_hat_pictures, final_picture = trajectory.pictures()
    position = {int(t): s for s, t in enumerate(trajectory.timesteps.tolist())}
    cols, rows = len(steps) + 1, 1 + 2 * k
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.15 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, t in enumerate(steps):
        ax = axes[0, c]
        ax.axis("on")
        _show(ax, x0_hat_pictures[position[t]], title=f"x0_hat, t={t}")
        for r in range(k):
            for sign, offset, color in (("positive", 1, GREEN), ("negative", 1 + k, RED)):
                index = int(result[f"{sign}_indices"][r, c])
                value = float(result[f"{sign}_values"][r, c])
                ax = axes[offset + r, c]
                ax.axis("on")
                _show(ax, images([index])[0], color, title=f"#{index} {value:+.2g}")
    axes[0, -1].axis("on")
    _show(axes[0, -1], final_picture, title="final")
    caption = f"target {trajectory.target_id} (seed {trajectory.seed})" + (
        f": {trajectory.prompt}" if trajectory.prompt else "")
    fig.suptitle(f"{caption} - top {k} positive (green) and negative (red) influencers per step"
                 + _ranked_among(result), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_figure"):
        experiment.add_figure(f"influencers/target_{trajectory.target_id:04d}", fig)
    plt.close(fig)
    return path


def _ranked_among(result: dict) -> str:
    """How the picture's influencers were chosen, when not among every row of a model trained on all of them."""
    rank, base = result.get("rank"), result.get("member_base_rate", 1.0)
    if rank == "nonmembers":
        return ", among non-members: the predicted effect of ADDING them"
    return ", among training members" if rank == "members" and base < 1 else ""


def _member_fractions(result: dict) -> str:
    fractions = result.get("member_fraction_positive")
    return "" if fractions is None else " ".join(f"{float(f):.2f}" for f in fractions)


def write_index(entries: list[dict], out_dir: str | Path) -> Path:
    """``index.html`` (and ``index.md``) linking every target's picture, with its top influencers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_html, rows_md = [], ["# Attribution report", "", "| target | seed | steps | top positive at the last step | "
                                                          "member fraction of the top-k positive per step | picture |",
                             "|---|---|---|---|---|---|"]
    for entry in entries:
        traj, result, picture = entry["trajectory"], entry["result"], entry["picture"]
        top = ", ".join(f"#{int(i)}" for i in result["positive_indices"][:4, -1])
        steps = " ".join(str(int(t)) for t in result["timesteps"])
        name = picture.name if picture else ""
        fractions = _member_fractions(result)
        rows_md.append(f"| {traj.target_id} | {traj.seed} | {steps} | {top} | {fractions} | [{name}]({name}) |")
        prompt = f"<p>{html.escape(traj.prompt)}</p>" if traj.prompt else ""
        prompt += (f"<p>member fraction of the top-k positive influencers per step ({html.escape(steps)}): "
                   f"{fractions}{html.escape(_ranked_among(result))}</p>") if fractions else ""
        rows_html.append(f"<h2>target {traj.target_id} (seed {traj.seed})</h2>{prompt}"
                         + (f'<img src="{html.escape(name)}" style="image-rendering:pixelated">' if name else ""))
    atomic_write_text(out_dir / "index.md", "\n".join(rows_md) + "\n")
    page = out_dir / "index.html"
    atomic_write_text(page, "<html><head><meta charset='utf-8'><title>Attribution report</title></head><body>"
                    "<h1>Attribution report</h1><p>Positive score: including the training image lowers the step "
                    "output f_t (makes this image more likely). Green: top positive, red: top negative.</p>"
                    + "".join(rows_html) + "</body></html>")
    return page
