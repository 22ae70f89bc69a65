"""The layers inside the training loop of Flax's ImageNet example, on 8 CPU devices.

The loop's patterns, in a small model of our own: normalization layers created
without a name through `functools.partial(norm, use_running_average=not train,
axis_name="batch", ...)`, a `TrainState` that carries `batch_stats`, a
`jax.pmap(train_step, axis_name="batch")` step that averages the gradients and the
whole `batch_stats` tree with `lax.pmean`, and checkpoints written by orbax.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import jax_utils
from flax.training import train_state
from jax import lax

import jaxrenorm
from jaxrenorm import schedules

DEVICES = 8
STEPS = 4


class TrainState(train_state.TrainState):
    batch_stats: dict


class SmallResNet(nn.Module):
    """Conv -> norm -> relu -> residual block -> pooled dense, every norm unnamed."""

    norm: type
    renorm_steps: int | None = None  # a BatchRenorm schedule of this length

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        extra = {}
        if self.renorm_steps is not None:
            r_max, d_max = schedules.scaled_paper_schedules(self.renorm_steps)
            extra = {"r_max": r_max, "d_max": d_max}
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name="batch",
            **extra,
        )
        x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        y = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        y = norm(scale_init=nn.initializers.zeros)(nn.Conv(8, (3, 3), use_bias=False)(y))
        return nn.Dense(4)(jnp.mean(nn.relu(x + y), axis=(1, 2)))


def _data(seed: int = 0):
    """(images, labels) with a leading device axis: 4 images of 6x6x3 per device."""
    kx, ky = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(kx, (DEVICES, 4, 6, 6, 3)) + 0.5
    labels = jax.random.randint(ky, (DEVICES, 4), 0, 4)
    return images, labels


def _create_state(model: nn.Module) -> TrainState:
    variables = model.init(jax.random.key(1), jnp.ones((1, 6, 6, 3)), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.05, momentum=0.9, nesterov=True),
        batch_stats=variables["batch_stats"],
    )


def _train_step(state: TrainState, images, labels, sync=None):
    """The example's step; `sync` averages the new batch_stats (default: `lax.pmean`)."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name="batch")
    sync = sync or (lambda stats: lax.pmean(stats, "batch"))
    new_state = state.apply_gradients(grads=grads, batch_stats=sync(new_model_state["batch_stats"]))
    return new_state, lax.pmean(loss, "batch")


def _eval_logits(state: TrainState, images):
    return state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )


_p_eval = jax.pmap(_eval_logits, axis_name="batch")


def _replicate(state: TrainState) -> TrainState:
    """One copy per device, placed as the pmapped step places its outputs.

    (`jax_utils.replicate` places them otherwise, which alone makes pmap compile
    the step again at the second step, whatever the layers.)
    """
    return jax.pmap(lambda s: s, axis_name="batch")(jax_utils.replicate(state))


def _train(model: nn.Module, steps: int, state=None, train_step=_train_step):
    """`steps` steps of `jax.pmap(train_step)` from a fresh (or the given) state.

    Returns the states after each step and the losses.
    """
    step = jax.pmap(train_step, axis_name="batch")
    state = _replicate(_create_state(model)) if state is None else state
    images, labels = _data()
    states, losses = [], []
    for _ in range(steps):
        state, loss = step(state, images, labels)
        states.append(state)
        losses.append(float(loss[0]))
    return states, losses


@functools.cache
def _flax_run():
    return _train(SmallResNet(nn.BatchNorm), STEPS)


def test_batch_norm_equals_flax_step_for_step():
    """Same variable names and values; every step's state within float32 round-off."""
    flax_states, _ = _flax_run()
    ours, _ = _train(SmallResNet(jaxrenorm.linen.BatchNorm), STEPS)
    init = _create_state(SmallResNet(jaxrenorm.linen.BatchNorm))
    init_flax = _create_state(SmallResNet(nn.BatchNorm))
    chex.assert_trees_all_equal(init.params, init_flax.params)
    chex.assert_trees_all_equal(init.batch_stats, init_flax.batch_stats)
    for theirs, mine in zip(flax_states, ours, strict=True):
        # Flax's default variance is E[x^2] - E[x]^2, jaxrenorm's a shifted one:
        # the same up to round-off on this centred data.
        chex.assert_trees_all_close(mine.params, theirs.params, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(mine.batch_stats, theirs.batch_stats, rtol=2e-5, atol=2e-6)


def _renorm_model() -> SmallResNet:
    return SmallResNet(jaxrenorm.linen.BatchRenorm, renorm_steps=STEPS)


def _steps_of(state) -> list:
    return [layer["steps"] for layer in state.batch_stats.values()]


def test_batch_renorm_under_the_examples_pmean_counts_and_trains():
    """`lax.pmean` hands the counter back as a float; the layers read it as an integer.

    The state's dtype changes once, at the first step, so the step compiles twice
    (what `jaxrenorm.sync_batch_stats` avoids), and never again.
    """
    traces = []

    def train_step(state, images, labels):
        traces.append(jax.tree.map(lambda leaf: leaf.dtype, state.batch_stats))
        return _train_step(state, images, labels)

    states, losses = _train(_renorm_model(), 2 * STEPS, train_step=train_step)
    assert len(traces) == 2
    for k, state in enumerate(states, start=1):
        for steps in _steps_of(state):
            assert steps.dtype == jnp.float32  # pmean divides: not the layer's doing
            np.testing.assert_array_equal(steps, k)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # The next training call writes the counter back as int32.
    p_train = jax.pmap(
        lambda state, images: state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )[1],
        axis_name="batch",
    )
    updates = p_train(states[-1], _data()[0])
    for steps in [layer["steps"] for layer in updates["batch_stats"].values()]:
        assert steps.dtype == jnp.int32
        np.testing.assert_array_equal(steps, 2 * STEPS + 1)


def test_sync_batch_stats_keeps_the_counter_int32_and_the_step_traces_once():
    sync = functools.partial(jaxrenorm.sync_batch_stats, axis_name="batch")

    @chex.assert_max_traces(n=1)
    def train_step(state, images, labels):
        return _train_step(state, images, labels, sync=sync)

    states, losses = _train(_renorm_model(), 2 * STEPS, train_step=train_step)
    for k, state in enumerate(states, start=1):
        for steps in _steps_of(state):
            assert steps.dtype == jnp.int32
            np.testing.assert_array_equal(steps, k)
    assert losses[-1] < losses[0], losses
    # The running statistics are averaged: identical on every device.
    for leaf in jax.tree.leaves(states[-1].batch_stats):
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


def test_flax_checkpoint_restores_into_batch_renorm_through_orbax(tmp_path):
    """Trained with flax.linen.BatchNorm, saved by orbax, restored into BatchRenorm."""
    flax_states, _ = _flax_run()
    flax_state = jax_utils.unreplicate(flax_states[-1])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "flax", flax_state)
    checkpointer.wait_until_finished()

    target = _create_state(_renorm_model())
    restored = checkpointer.restore(tmp_path / "flax")  # without a target: as saved
    state = jaxrenorm.linen.convert_variables(restored, target)

    assert sorted(state.batch_stats) == ["BatchRenorm_0", "BatchRenorm_1", "BatchRenorm_2"]
    for name, layer in state.batch_stats.items():
        flax_layer = flax_state.batch_stats[name.replace("BatchRenorm", "BatchNorm")]
        np.testing.assert_array_equal(layer["mean"], flax_layer["mean"])
        np.testing.assert_array_equal(layer["var"], flax_layer["var"])
        assert layer["steps"].dtype == jnp.int32 and int(layer["steps"]) == 0
    assert int(state.step) == STEPS
    # The optimizer state (momentum) came along under the new names.
    chex.assert_trees_all_equal(
        jax.tree.leaves(state.opt_state), jax.tree.leaves(flax_state.opt_state)
    )
    images = _data(seed=1)[0]
    np.testing.assert_array_equal(
        _p_eval(_replicate(state), images),
        _p_eval(flax_states[-1], images),
    )
    # Training goes on from there.
    states, losses = _train(_renorm_model(), 2, state=_replicate(state))
    assert all(np.isfinite(losses))
    assert {int(s[0]) for s in _steps_of(states[-1])} == {2}


def test_convert_variables_goes_back_and_between_layers():
    x = jnp.ones((2, 6, 6, 3))
    flax_vars = SmallResNet(nn.BatchNorm).init(jax.random.key(0), x, train=False)
    brn_vars = _renorm_model().init(jax.random.key(0), x, train=False)
    irn = SmallResNet(jaxrenorm.linen.InstanceRenorm, renorm_steps=STEPS)
    irn_vars = irn.init(jax.random.key(0), x, train=False)

    to_irn = jaxrenorm.linen.convert_variables(flax_vars, irn_vars)
    assert set(to_irn["params"]["InstanceRenorm_1"]) == {"scale", "bias", "rho"}
    np.testing.assert_array_equal(to_irn["params"]["InstanceRenorm_1"]["rho"], 0.5)
    back = jaxrenorm.linen.convert_variables(to_irn, flax_vars)
    chex.assert_trees_all_equal(back, flax_vars)
    between = jaxrenorm.linen.convert_variables(irn_vars, brn_vars)
    assert set(between["params"]["BatchRenorm_0"]) == {"scale", "bias"}
    assert jax.tree.structure(between) == jax.tree.structure(brn_vars)


def test_convert_variables_refuses_what_it_cannot_map():
    x = jnp.ones((2, 6, 6, 3))
    flax_vars = SmallResNet(nn.BatchNorm).init(jax.random.key(0), x, train=False)
    target = _renorm_model().init(jax.random.key(0), x, train=False)
    del flax_vars["batch_stats"]["BatchNorm_2"]
    flax_vars["params"]["Conv_1"]["kernel"] = jnp.ones((1, 1, 8, 8))
    with pytest.raises(ValueError, match="cannot map") as error:
        jaxrenorm.linen.convert_variables(flax_vars, target)
    message = str(error.value)
    assert "batch_stats: 2 normalization layers without a name in the source" in message
    assert "params/Conv_1/kernel: shape (3, 3, 8, 8) in the target, (1, 1, 8, 8)" in message


def test_apply_with_a_flax_checkpoint_names_the_cause():
    x = jnp.ones((2, 6, 6, 3))
    flax_vars = SmallResNet(nn.BatchNorm).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="Found BatchNorm_0, BatchNorm_1, BatchNorm_2") as error:
        _renorm_model().apply(flax_vars, x, train=False)
    assert "convert_variables" in str(error.value)


@pytest.mark.parametrize("family", ["linen", "nnx"])
def test_a_float_counter_is_read_as_the_nearest_integer_and_written_back_int32(family):
    r_max, d_max = schedules.scaled_paper_schedules(8)
    x = jax.random.normal(jax.random.key(0), (8, 3))
    if family == "linen":
        layer = jaxrenorm.linen.BatchRenorm(use_running_average=False, r_max=r_max, d_max=d_max)
        variables = layer.init(jax.random.key(1), x)
        variables["batch_stats"]["steps"] = jnp.float32(2.9999998)
        _, updates = layer.apply(variables, x, mutable=["batch_stats"])
        steps = updates["batch_stats"]["steps"]
    else:
        from flax import nnx

        layer = jaxrenorm.nnx.BatchRenorm(3, r_max=r_max, d_max=d_max, rngs=nnx.Rngs(0))
        layer.steps = nnx.BatchStat(jnp.float32(2.9999998))  # as nnx.update would set it
        layer(x)
        steps = layer.steps[...]
    assert steps.dtype == jnp.int32 and int(steps) == 4
