"""The workflows of docs/guides/workflows.md, each checked the long way.

Gradient accumulation (optax.MultiSteps and a scan over micro-batches against a
loop over the micro-batches), the per-micro-batch momentum and schedules, frozen
statistics in linen and NNX, ensembles with and without synced statistics, a
normalization layer in a scanned recurrent cell, per-example gradients with
batch statistics, and device groups.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxrenorm
from tests import reference

RNG = np.random.default_rng(0)
X = (RNG.normal(size=(32, 3)) * 2 + 1).astype(np.float32)
Y = RNG.integers(0, 2, size=32)


class Net(nn.Module):
    """Dense -> BatchRenorm (scheduled bounds) -> relu -> Dense, with a named norm."""

    momentum: float = 0.9
    r_max: Any = 1.0
    d_max: Any = 0.0
    axis_name: Any = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4, use_bias=False)(x)
        x = jaxrenorm.linen.BatchRenorm(
            use_running_average=not train,
            momentum=self.momentum,
            r_max=self.r_max,
            d_max=self.d_max,
            axis_name=self.axis_name,
            name="norm",
        )(x)
        return nn.Dense(2)(nn.relu(x))


def _loss(model, params, batch_stats, x, y):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]


def _close(a, b, rtol=1e-5):
    """Trees equal up to float32 round-off, scaled to each leaf's largest value."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(float(np.max(np.abs(v))), 1e-6)
        np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale)


# --- gradient accumulation ----------------------------------------------------------


def test_accumulation_with_multisteps_and_scan_is_the_loop_over_micro_batches():
    """One optimizer step over K micro-batches, three ways: optax.MultiSteps with a
    TrainState, a lax.scan, and a Python loop (the long way). Each micro-batch is
    normalized by its own statistics and updates the running ones; `steps` counts K."""
    k, micro, steps = 4, 8, 10
    r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(steps, micro_batches=k)
    model = Net(momentum=jaxrenorm.micro_batch_momentum(0.9, k), r_max=r_max, d_max=d_max)
    variables = model.init(jax.random.key(0), X[:2], train=False)
    grad = jax.jit(jax.grad(lambda *a: _loss(model, *a), has_aux=True))
    split = lambda a: a.reshape(k, micro, *a.shape[1:])  # noqa: E731

    # The long way: each micro-batch's gradient with the statistics the previous left.
    stats, total = variables["batch_stats"], None
    for xs, ys in zip(split(X), split(Y), strict=True):
        g, stats = grad(variables["params"], stats, xs, ys)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    adam = optax.adam(1e-2)

    @jax.jit
    def one_update(params, total):
        updates, _ = adam.update(jax.tree.map(lambda t: t / k, total), adam.init(params), params)
        return optax.apply_updates(params, updates)

    expected = one_update(variables["params"], total)

    class State(train_state.TrainState):
        batch_stats: Any

    state = State.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.MultiSteps(adam, every_k_schedule=k),
        batch_stats=variables["batch_stats"],
    )

    @jax.jit
    def micro_step(state, xs, ys):
        g, new_stats = grad(state.params, state.batch_stats, xs, ys)
        return state.apply_gradients(grads=g).replace(batch_stats=new_stats)

    for xs, ys in zip(split(X), split(Y), strict=True):
        state = micro_step(state, xs, ys)
    _close(state.params, expected)
    _close(state.batch_stats, stats)
    assert int(state.batch_stats["norm"]["steps"]) == k == int(state.opt_state.mini_step) + k

    def scanned(params, batch_stats):
        def body(carry, batch):
            total, batch_stats = carry
            g, batch_stats = grad(params, batch_stats, *batch)
            return (jax.tree.map(jnp.add, total, g), batch_stats), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (total, batch_stats), _ = jax.lax.scan(body, (zeros, batch_stats), (split(X), split(Y)))
        return jax.tree.map(lambda t: t / k, total), batch_stats

    mean_grads, scan_stats = jax.jit(scanned)(variables["params"], variables["batch_stats"])
    _close(mean_grads, jax.tree.map(lambda t: t / k, total))
    _close(scan_stats, stats)


def test_micro_batch_momentum_decays_by_the_momentum_per_optimizer_step():
    """K updates with momentum ** (1 / K) from K micro-batches with the same statistics
    are one update with `momentum` (the float64 reference)."""
    x = X.reshape(4, 8, 3)[0]
    momentum, k = 0.9, 8
    stats = {"mean": np.full(3, 5.0, np.float32), "var": np.full(3, 0.25, np.float32)}
    params = {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}
    step = jax.jit(
        lambda s, m: jaxrenorm.batch_norm(x, params, s, use_running_average=False, momentum=m)[1]
    )
    new = stats
    for _ in range(k):
        new = step(new, jaxrenorm.micro_batch_momentum(momentum, k))
    ref = reference.normalize(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], x, momentum=momentum
    )
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-6)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-6)
    assert jaxrenorm.micro_batch_momentum(0.0, 4) == 0.0
    assert jaxrenorm.micro_batch_momentum(0.99, 1) == 0.99
    with pytest.raises(ValueError, match="micro_batches"):
        jaxrenorm.micro_batch_momentum(0.9, 0)
    with pytest.raises(ValueError, match="momentum"):
        jaxrenorm.micro_batch_momentum(1.5, 2)


def test_schedules_in_optimizer_steps():
    """The ramps reach their milestones at the same optimizer step whatever K."""
    steps, k = 80, 4
    per_step = jaxrenorm.schedules.scaled_paper_schedules(steps)
    per_call = jaxrenorm.schedules.scaled_paper_schedules(steps, micro_batches=k)
    for schedule, scaled in zip(per_step, per_call, strict=True):
        wrapped = jaxrenorm.schedules.in_optimizer_steps(schedule, k)
        for t in (0, 10, 11, 30, 50, 79, 80):
            np.testing.assert_allclose(scaled(t * k), schedule(t), rtol=1e-6)
            for call in range(t * k, t * k + k):
                np.testing.assert_allclose(wrapped(call), schedule(t), rtol=1e-6)
    with pytest.raises(ValueError, match="micro_batches"):
        jaxrenorm.schedules.scaled_paper_schedules(10, micro_batches=0)
    with pytest.raises(ValueError, match="micro_batches"):
        jaxrenorm.schedules.in_optimizer_steps(per_step[0], 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a schedule"):
        jaxrenorm.schedules.in_optimizer_steps(3.0, 2)  # type: ignore[arg-type]


# --- frozen statistics --------------------------------------------------------------


class FineTuned(nn.Module):
    """A backbone (this package's BatchRenorm, flax's BatchNorm) and a head norm.

    `freeze` does the long way what `frozen_statistics("backbone")` does."""

    freeze: bool = False

    @nn.compact
    def __call__(self, x):
        backbone = Backbone(frozen=self.freeze, name="backbone")
        x = backbone(x)
        return jaxrenorm.linen.BatchNorm(use_running_average=False, name="head")(x)


class Backbone(nn.Module):
    frozen: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, use_bias=False)(x)
        x = jaxrenorm.linen.BatchRenorm(use_running_average=self.frozen, r_max=2.0, d_max=1.0)(x)
        # flax's layer, the mode given at call time
        return nn.BatchNorm(momentum=0.5)(nn.relu(x), use_running_average=self.frozen)


def test_frozen_statistics_freezes_the_layers_under_the_paths_in_linen():
    model = FineTuned()
    variables = model.init(jax.random.key(1), X)
    # Running statistics that differ from the batch's, so freezing changes the output.
    variables = jax.tree.map(lambda v: v + 0.3 if v.dtype == jnp.float32 else v, variables)

    def train(model, paths=None):
        def apply(variables):
            return model.apply(variables, X, mutable=["batch_stats"])

        if paths is None:
            return jax.jit(apply)(variables)

        def frozen(variables):
            with jaxrenorm.linen.frozen_statistics(*paths):
                return apply(variables)

        return jax.jit(frozen)(variables)

    y, updates = train(model, ("backbone",))
    y_long, updates_long = train(FineTuned(freeze=True))
    np.testing.assert_array_equal(y, y_long)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, updates, updates_long)))
    same = jax.tree.map(np.array_equal, updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(same["backbone"])) and not any(jax.tree.leaves(same["head"]))
    # A pattern matches whole names: "back" is not "backbone".
    y_prefix, _ = train(model, ("back",))
    np.testing.assert_array_equal(y_prefix, train(model)[0])
    # No paths: everything frozen; a layer's own path; an alternative in a pattern.
    _, all_frozen = train(model, ())
    same = jax.tree.map(np.array_equal, all_frozen["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(same))
    _, one = train(model, ("backbone/BatchNorm_0|nothing",))
    assert np.array_equal(
        one["batch_stats"]["backbone"]["BatchNorm_0"]["mean"],
        variables["batch_stats"]["backbone"]["BatchNorm_0"]["mean"],
    )
    assert not np.array_equal(
        one["batch_stats"]["backbone"]["BatchRenorm_0"]["mean"],
        variables["batch_stats"]["backbone"]["BatchRenorm_0"]["mean"],
    )
    with pytest.raises(TypeError, match="the paths must be strings"):
        with jaxrenorm.linen.frozen_statistics(3):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="not a regular expression"):
        with jaxrenorm.linen.frozen_statistics("back("):
            pass


def test_nnx_view_freezes_chosen_layers_and_trains_the_rest_in_place():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.backbone = jaxrenorm.nnx.BatchRenorm(3, rngs=rngs)  # the paper's schedules
            self.head = jaxrenorm.nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.backbone(x))

    model = Model(nnx.Rngs(0))
    long_way = Model(nnx.Rngs(0))
    long_way.backbone.use_running_average = True
    y = nnx.view(model, only=nnx.PathContains("backbone"), use_running_average=True)(X)
    np.testing.assert_array_equal(y, long_way(X))
    assert int(model.backbone.steps[...]) == 0 and float(model.backbone.mean[...].sum()) == 0
    np.testing.assert_array_equal(model.head.mean[...], long_way.head.mean[...])
    assert float(jnp.abs(model.head.mean[...]).sum()) > 0


# --- ensembles, scans, per-example gradients ------------------------------------------


def test_ensemble_statistics_unsynced_and_synced():
    """Each member's own batch without an axis name; every member's batch with it."""
    init = jax.jit(jax.vmap(lambda key: Net().init(key, X[:2])))
    members = init(jax.random.split(jax.random.key(2), 4))
    xs = X.reshape(4, 8, 3)

    def stats(model, variables, x):
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
        return updates["batch_stats"]["norm"]

    unsynced = jax.jit(jax.vmap(lambda v, x: stats(Net(), v, x)))(members, xs)
    synced = jax.jit(jax.vmap(lambda v, x: stats(Net(axis_name="e"), v, x), axis_name="e"))(
        members, xs
    )
    kernels = np.asarray(members["params"]["Dense_0"]["kernel"], np.float64)
    features = [np.asarray(xs[e], np.float64) @ kernels[e] for e in range(4)]
    # Synced: the statistics of every member's features (each member's own weights)
    # pooled, the same in every member.
    pooled = np.concatenate(features)
    for e in range(4):
        for h, result in ((features[e], unsynced), (pooled, synced)):
            mean, var, _ = reference.moments(h, (0,))
            np.testing.assert_allclose(result["mean"][e], 0.1 * mean[0], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(result["var"][e], 0.9 + 0.1 * var[0], rtol=1e-5)


class Cell(nn.Module):
    @nn.compact
    def __call__(self, h, x_t):
        h = nn.Dense(4)(jnp.concatenate([h, x_t], -1))
        return jnp.tanh(jaxrenorm.linen.BatchRenorm(use_running_average=False)(h)), None


class NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4 + 3, 4, rngs=rngs)
        self.norm = jaxrenorm.nnx.BatchRenorm(4, rngs=rngs)

    def __call__(self, h, x_t):
        return jnp.tanh(self.norm(self.dense(jnp.concatenate([h, x_t], -1))))


def test_scanned_recurrent_cell_carries_the_statistics_through_time():
    """nn.scan with `variable_carry="batch_stats"` and nnx.scan with the module in the
    carry: the same outputs and statistics as the unrolled loop over time steps."""
    sequences, h0 = X.reshape(8, 4, 3), jnp.zeros((8, 4))
    variables = Cell().init(jax.random.key(3), h0, sequences[:, 0])
    scanned = nn.scan(
        Cell,
        variable_broadcast="params",
        variable_carry="batch_stats",
        split_rngs={"params": False},
        in_axes=1,
    )
    (h, _), updates = scanned().apply(variables, h0, sequences, mutable=["batch_stats"])
    h_long, stats = h0, variables["batch_stats"]
    for t in range(4):
        (h_long, _), u = Cell().apply(
            {"params": variables["params"], "batch_stats": stats},
            h_long,
            sequences[:, t],
            mutable=["batch_stats"],
        )
        stats = u["batch_stats"]
    _close(h, h_long)
    _close(updates["batch_stats"], stats)
    assert int(stats["BatchRenorm_0"]["steps"]) == 4

    @nnx.scan(in_axes=(nnx.Carry, 1), out_axes=nnx.Carry)
    def run(carry, x_t):
        cell, h = carry
        return cell, cell(h, x_t)

    cell, h = run((NNXCell(nnx.Rngs(3)), h0), sequences)
    long_cell, h_long = NNXCell(nnx.Rngs(3)), h0
    for t in range(4):
        h_long = long_cell(h_long, sequences[:, t])
    _close(h, h_long)
    _close(nnx.state(cell, nnx.BatchStat), nnx.state(long_cell, nnx.BatchStat))


def test_per_example_gradients_are_the_batch_loss_through_each_examples_copy():
    """vmap of the gradient of one example's loss, the layers naming the vmapped axis:
    example i's gradient is that of the batch's loss with respect to a copy of the
    parameters used by example i alone, and they sum to the batch gradient."""
    model = Net(axis_name="batch")
    variables = model.init(jax.random.key(4), X[0])

    def example_loss(params, x, y):
        return _loss(model, params, variables["batch_stats"], x, y)[0]

    per_example = jax.jit(
        jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0), axis_name="batch")
    )(variables["params"], X, Y)

    def batch_loss(copies):
        losses = jax.vmap(example_loss, axis_name="batch")(copies, X, Y)
        return losses.sum()

    copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(X), *p.shape)), variables["params"])
    _close(per_example, jax.jit(jax.grad(batch_loss))(copies), rtol=1e-5)

    def whole_batch(params):
        logits, _ = Net().apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, X, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).sum()

    total = jax.tree.map(lambda g: g.sum(0), per_example)
    _close(total, jax.jit(jax.grad(whole_batch))(variables["params"]), rtol=1e-5)


# --- device groups ------------------------------------------------------------------


def test_device_groups():
    assert jaxrenorm.device_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert jaxrenorm.device_groups(8, 8) == [list(range(8))]
    assert jaxrenorm.device_groups(3, 1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"must divide `num_devices` \(8\).*\[1, 2, 4, 8\]"):
        jaxrenorm.device_groups(8, 3)
    with pytest.raises(ValueError, match="devices_per_group"):
        jaxrenorm.device_groups(8, 0)
    with pytest.raises(ValueError, match="num_devices"):
        jaxrenorm.device_groups(2.0, 1)  # type: ignore[arg-type]
