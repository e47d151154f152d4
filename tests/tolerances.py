"""Tolerances for float32 results, derived (never tuned): float32 epsilon times the length of the reduction
that produced the value, against a float64 reference or as a propagated worst-case bound."""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def assert_float32_close(result: torch.Tensor, ref64: torch.Tensor, reduction_length: int) -> None:
    """A float32 result against its float64 reference, within ``eps32 * reduction_length * max|ref|``: the
    worst-case rounding of sums of ``reduction_length`` float32 terms."""
    assert result.dtype == torch.float32
    atol = EPS32 * reduction_length * float(ref64.abs().max())
    torch.testing.assert_close(result.double(), ref64.double(), rtol=0, atol=atol)


def score_rounding_bound(module, target_id: int, t: int) -> float:
    """How far an AttributionModule's float32 scores of one (target, step) pair can move when the pair's target
    gradient is recomputed in another batch (another vmap batch, another rank, another patch grouping).

    Per checkpoint m the gradient ``g`` (float32, a sum over the ``p`` projected parameters) is off by at most
    ``eps32 * p * ||g||``; the scores ``Phi (K + lam I)^-1 g`` move by at most ``max_i ||phi_i|| / (s_min + lam)``
    times that; the checkpoints are averaged. Compare with ``atol`` = this bound and ``rtol=2 * EPS32`` (the
    float32 storage of the two scores).
    """
    traj = next(tr for tr in module.trajectories if tr.target_id == target_id)
    s = traj.position(t)
    x_t, steps, target = traj.x_t[s:s + 1], traj.timesteps[s:s + 1], torch.tensor([target_id])
    cond = None if traj.cond is None else traj.cond.unsqueeze(0)
    bound = 0.0
    with torch.enable_grad():
        for m, store in enumerate(module.stores):
            g = module.target_gradients(m, x_t, steps, target, cond)
            phi = store.read(dtype=torch.float64).norm(dim=1).max()
            s_min = float(module.kernels[m].eigenvalues.min())
            bound += float(phi) / (s_min + module.lams[m]) * EPS32 * module.projectors[m].p * float(g.norm())
    return bound / len(module.stores)
