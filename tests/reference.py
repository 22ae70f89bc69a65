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
):
    """BatchNorm (r_max=None) or Batch Renormalization; returns outputs and gradients.

    `scale`, `bias`, `mean`, `var` are feature-shaped; `g` is the upstream gradient
    (same shape as x); the gradients returned are those of sum(g * y).
    """
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
    dx = (
        gh
        - m * gh.sum(axis=ra, keepdims=True) / n
        - m * xhat * (gh * xhat).sum(axis=ra, keepdims=True) / n
    ) / s_b

    # A feature with no valid element keeps its running statistics.
    new_mean = np.where(count > 0, momentum * mu_run + (1 - momentum) * mu_b, mu_run)
    new_var = np.where(count > 0, momentum * var_run + (1 - momentum) * var_b, var_run)
    return Result(
        y=y,
        new_mean=new_mean.reshape(fshape),
        new_var=new_var.reshape(fshape),
        dx=dx,
        dscale=(g * (xhat * r + d)).sum(axis=ra).reshape(fshape),
        dbias=g.sum(axis=ra).reshape(fshape),
        r=r.reshape(fshape),
        d=d.reshape(fshape),
    )
