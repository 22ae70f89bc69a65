"""An independent float64 NumPy implementation of BatchNorm and Batch Renormalization.

Written from the papers (Ioffe & Szegedy 2015; Ioffe 2017, Algorithm 1) and Flax's
running-statistics convention, without calling jaxrenorm. Gradients are the
closed-form derivatives, not autodiff. Everything is computed in float64 with
the feature axes kept (size-1 reduced axes) so arrays broadcast against x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def split_axes(ndim: int, axis) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feature = tuple(sorted({a % ndim for a in np.atleast_1d(axis).tolist()}))
    return feature, tuple(i for i in range(ndim) if i not in feature)


def keep(v, x_shape, feature_axes):
    """Reshapes a feature-shaped array so it broadcasts against x."""
    shape = [x_shape[i] if i in feature_axes else 1 for i in range(len(x_shape))]
    return np.asarray(v, np.float64).reshape(shape)


def moments(x, axes, mask=None):
    """(mean, biased var, count) over `axes` and valid positions, keepdims, two-pass."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = m.sum(axis=axes, keepdims=True)
    xs = np.where(m, x, 0.0)
    safe = np.maximum(count, 1)
    mean = xs.sum(axis=axes, keepdims=True) / safe
    var = (np.where(m, (x - mean) ** 2, 0.0)).sum(axis=axes, keepdims=True) / safe
    return mean, var, count


@dataclass
class Result:
    y: np.ndarray
    new_mean: np.ndarray  # feature shape
    new_var: np.ndarray
    dx: np.ndarray  # gradients of sum(g * y)
    dscale: np.ndarray
    dbias: np.ndarray
    r: np.ndarray | None = None
    d: np.ndarray | None = None
    batch_mean: np.ndarray | None = None  # feature shape (per group with virtual batches)
    batch_var: np.ndarray | None = None
    count: np.ndarray | None = None


def normalize(
    x,
    scale,
    bias,
    mean,
    var,
    g,
    *,
    axis=-1,
    train=True,
    momentum=0.99,
    eps=1e-5,
    mask=None,
    r_max=None,
    d_max=None,
    grad_through_batch_moments=True,
    virtual_batch_size=None,
    bessel_correction=False,
):
    """BatchNorm (r_max=None) or Batch Renormalization; returns outputs and gradients.

    `scale`, `bias`, `mean`, `var` are feature-shaped; `g` is the upstream gradient
    (same shape as x); the gradients returned are those of sum(g * y). With
    `virtual_batch_size`, each consecutive group of that many examples along axis 0
    is normalized as its own batch, and the running statistics move towards the
    mean over (non-empty) groups of the group means and variances.
    """
    kw = dict(
        axis=axis,
        momentum=momentum,
        eps=eps,
        r_max=r_max,
        d_max=d_max,
        grad_through_batch_moments=grad_through_batch_moments,
        bessel_correction=bessel_correction,
    )
    if train and virtual_batch_size is not None:
        return _virtual(x, scale, bias, mean, var, g, mask, virtual_batch_size, kw)
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    fa, ra = split_axes(x.ndim, axis)
    gamma = keep(scale, x.shape, fa)
    beta = keep(bias, x.shape, fa)
    mu_run = keep(mean, x.shape, fa)
    var_run = keep(var, x.shape, fa)
    fshape = np.shape(mean)

    if not train:
        s = np.sqrt(var_run + eps)
        xhat = (x - mu_run) / s
        y = gamma * xhat + beta
        return Result(
            y=y,
            new_mean=np.asarray(mean, np.float64),
            new_var=np.asarray(var, np.float64),
            dx=g * gamma / s,
            dscale=(g * xhat).sum(axis=ra).reshape(fshape),
            dbias=g.sum(axis=ra).reshape(fshape),
        )

    mu_b, var_b, count = moments(x, ra, mask)
    # A group without a valid element has no statistics of its own; it takes the
    # running mean (and variance 0), so r = sqrt(eps) / s and d = 0 there.
    mu_b = np.where(count > 0, mu_b, mu_run)
    s_b = np.sqrt(var_b + eps)
    xhat = (x - mu_b) / s_b
    if r_max is None:
        r, d = np.ones_like(s_b), np.zeros_like(s_b)
    else:
        s = np.sqrt(var_run + eps)
        r = np.clip(s_b / s, 1.0 / r_max, r_max)
        d = np.clip((mu_b - mu_run) / s, -d_max, d_max)
    y = gamma * (xhat * r + d) + beta

    # d y_j / d x_i through x_j, mu_B and var_B (r and d are constants).
    m = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    n = np.maximum(count, 1)
    gh = g * gamma * r  # dL/dxhat
    # The gradient through mu_B and var_B, scaled by `grad_through_batch_moments`
    # (True: 1; False: 0, mu_B and s_B are constants and y an affine map of x; or a
    # per-feature weight).
    weight = np.asarray(grad_through_batch_moments, np.float64)
    weight = weight if weight.ndim == 0 else keep(weight, x.shape, fa)
    dx = (
        gh
        - weight * m * gh.sum(axis=ra, keepdims=True) / n
        - weight * m * xhat * (gh * xhat).sum(axis=ra, keepdims=True) / n
    ) / s_b

    # A feature with no valid element keeps its running statistics.
    new_mean = np.where(count > 0, momentum * mu_run + (1 - momentum) * mu_b, mu_run)
    # PyTorch's (and the 2015 paper's) unbiased estimate, n / (n - 1), where n > 1.
    var_update = var_b * np.where(count > 1, count / np.maximum(count - 1, 1), 1.0)
    var_update = var_update if bessel_correction else var_b
    new_var = np.where(count > 0, momentum * var_run + (1 - momentum) * var_update, var_run)
    return Result(
        y=y,
        new_mean=new_mean.reshape(fshape),
        new_var=new_var.reshape(fshape),
        dx=dx,
        dscale=(g * (xhat * r + d)).sum(axis=ra).reshape(fshape),
        dbias=g.sum(axis=ra).reshape(fshape),
        r=r.reshape(fshape),
        d=d.reshape(fshape),
        batch_mean=mu_b.reshape(fshape),
        batch_var=var_update.reshape(fshape),
        count=count.reshape(fshape),
    )


def _virtual(x, scale, bias, mean, var, g, mask, v, kw):
    """Each group of v examples as its own batch; running stats from the group means."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    mask_full = None if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    if kw["grad_through_batch_moments"] == "adaptive" and kw["r_max"] is not None:
        kw = dict(kw, grad_through_batch_moments=_adaptive_weight(x, mask_full, v, kw))
    parts = [
        normalize(
            x[i : i + v],
            scale,
            bias,
            mean,
            var,
            g[i : i + v],
            train=True,
            mask=None if mask_full is None else mask_full[i : i + v],
            **kw,
        )
        for i in range(0, x.shape[0], v)
    ]
    valid = np.stack([p.count > 0 for p in parts])
    groups = np.maximum(valid.sum(0), 1)
    mu = np.where(valid, [p.batch_mean for p in parts], 0).sum(0) / groups
    var_b = np.where(valid, [p.batch_var for p in parts], 0).sum(0) / groups
    m = kw["momentum"]
    ok = valid.any(0)
    return Result(
        y=np.concatenate([p.y for p in parts]),
        new_mean=np.where(ok, m * np.asarray(mean) + (1 - m) * mu, mean),
        new_var=np.where(ok, m * np.asarray(var) + (1 - m) * var_b, var),
        dx=np.concatenate([p.dx for p in parts]),
        dscale=sum(p.dscale for p in parts),
        dbias=sum(p.dbias for p in parts),
        r=None if parts[0].r is None else np.stack([p.r for p in parts]),
        d=None if parts[0].d is None else np.stack([p.d for p in parts]),
    )


def _adaptive_weight(x, mask, v, kw):
    """exp(-max(F - 1, 0)) per feature, F = n s_b^2 / (s_w^2 + eps), the ANOVA F statistic.

    Over the groups of v examples with a valid element; n is their mean count, and
    the weight is 1 with fewer than two such groups.
    """
    fa, ra = split_axes(x.ndim, kw["axis"])
    stats = [
        moments(x[i : i + v], ra, None if mask is None else mask[i : i + v])
        for i in range(0, x.shape[0], v)
    ]
    mean, var, count = (np.stack([st[k] for st in stats]) for k in range(3))
    valid = count > 0
    groups = valid.sum(0)
    safe = np.maximum(groups, 1)
    grand = np.where(valid, mean, 0).sum(0) / safe
    n = np.where(valid, count, 0).sum(0) / safe
    # Unbiased estimates: the variance of the group means, the variance within groups.
    between = np.where(valid, (mean - grand) ** 2, 0).sum(0) / np.maximum(groups - 1, 1)
    within = np.where(valid, var, 0).sum(0) / safe * n / np.maximum(n - 1, 1)
    weight = np.where(groups > 1, np.exp(-np.maximum(n * between / (within + kw["eps"]) - 1, 0)), 1)
    return weight.reshape([x.shape[i] for i in fa])


def instance_renorm(
    x,
    scale,
    bias,
    rho,
    mean,
    var,
    g,
    *,
    axis=-1,
    train=True,
    momentum=0.99,
    eps=1e-5,
    mask=None,
    r_max=None,
    d_max=None,
    grad_through_batch_moments=True,
    virtual_batch_size=None,
    bessel_correction=False,
):
    """y = scale * (rho * BRN(x) + (1 - rho) * IN(x)) + bias, rho clipped to [0, 1].

    BRN is `normalize` without the affine map (running statistics at inference);
    IN(x) normalizes each example over its spatial axes, i.e. BatchNorm on a
    "batch" of one example, which is `normalize` with virtual batches of 1. Both
    branches are linear in their upstream gradient, so dx is the sum of the two
    branches' dx with upstream g * scale * rho and g * scale * (1 - rho). An
    example with no valid element (`mask`) has no moments of its own: its output
    is the batch branch's, gamma * BRN(x) + beta, as if rho were 1 there.
    Returns a `Result` with an extra attribute `drho`.
    """
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    fa, ra = split_axes(x.ndim, axis)
    fshape = np.shape(mean)
    gamma, beta = keep(scale, x.shape, fa), keep(bias, x.shape, fa)
    gate = keep(np.clip(rho, 0.0, 1.0), x.shape, fa)
    # An example with no valid element has no moments of its own: the batch branch alone.
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    empty = ~valid.any(axis=tuple(a for a in ra if a != 0), keepdims=True)
    gate = np.where(empty, 1.0, gate)
    ones, zeros = np.ones(fshape), np.zeros(fshape)
    batch = normalize(
        x,
        ones,
        zeros,
        mean,
        var,
        g * gamma * gate,
        axis=axis,
        train=train,
        momentum=momentum,
        eps=eps,
        mask=mask,
        r_max=r_max,
        d_max=d_max,
        grad_through_batch_moments=grad_through_batch_moments,
        virtual_batch_size=virtual_batch_size,
        bessel_correction=bessel_correction,
    )
    inst = normalize(
        x,
        ones,
        zeros,
        zeros,
        ones,
        g * gamma * (1 - gate),
        axis=axis,
        train=True,
        eps=eps,
        mask=mask,
        virtual_batch_size=1,
    )
    mixed = gate * batch.y + (1 - gate) * inst.y
    mixed = np.where(empty, batch.y, mixed)
    result = Result(
        y=gamma * mixed + beta,
        new_mean=batch.new_mean,
        new_var=batch.new_var,
        dx=batch.dx + inst.dx,
        dscale=(g * mixed).sum(axis=ra).reshape(fshape),
        dbias=g.sum(axis=ra).reshape(fshape),
        r=batch.r,
        d=batch.d,
    )
    result.drho = np.where(empty, 0.0, g * gamma * (batch.y - inst.y)).sum(axis=ra).reshape(fshape)
    return result
