"""Checkpoints: save, restore, continue bit-identically; Flax BatchNorm checkpoints load.

A run interrupted after k steps, saved (orbax-checkpoint or flax.serialization
msgpack), restored and continued must end with exactly the parameters, running
statistics (including BatchRenorm's int32 `steps`) and optimizer state of the
uninterrupted run: same machine, same compiled step, so equality is bitwise.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import jaxrenorm

STEPS, SPLIT = 6, 3


class Net(nn.Module):
    """Every jaxrenorm layer, BatchRenorm on a schedule so that `steps` is saved too."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = jaxrenorm.linen.InstanceRenorm(
            use_running_average=not train, r_max=1.5, d_max=0.5, name="irn"
        )(x)
        x = nn.relu(x).mean((1, 2))
        x = nn.Dense(16, use_bias=False)(x)
        x = jaxrenorm.linen.BatchRenorm(
            use_running_average=not train,
            r_max=jaxrenorm.schedules.r_max_schedule(2.0, begin=1, end=4),
            d_max=jaxrenorm.schedules.d_max_schedule(1.0, begin=1, end=3),
            name="brn",
        )(nn.relu(x))
        x = jaxrenorm.linen.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(3)(x)


def _data(step):
    key = jax.random.fold_in(jax.random.key(0), step)
    x = jax.random.normal(key, (8, 6, 6, 2)) * 2 + 1
    return x, jax.random.randint(jax.random.fold_in(key, 1), (8,), 0, 3)


TX = optax.adam(1e-2)


@jax.jit
def _step(state, step):
    params, batch_stats, opt = state["params"], state["batch_stats"], state["opt"]
    x, y = _data(step)

    def loss_fn(params):
        logits, upd = Net().apply(
            {"params": params, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    grads, upd = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt = TX.update(grads, opt, params)
    return {
        "params": optax.apply_updates(params, updates),
        "batch_stats": upd["batch_stats"],
        "opt": opt,
    }


def _initial_state():
    variables = Net().init(jax.random.key(1), _data(0)[0], False)
    return {**variables, "opt": TX.init(variables["params"])}


def _train(state, start, stop):
    for step in range(start, stop):
        state = _step(state, step)
    return state


def _assert_bitwise_equal(a, b):
    chex.assert_trees_all_equal(a, b, strict=True)


@pytest.fixture(scope="module")
def uninterrupted():
    state = _train(_initial_state(), 0, STEPS)
    assert int(state["batch_stats"]["brn"]["steps"]) == STEPS
    return state


def _orbax_roundtrip(state, tmp_path):
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "orbax"
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return checkpointer.restore(path, target)


def _msgpack_roundtrip(state, tmp_path):
    path = tmp_path / "state.msgpack"
    path.write_bytes(serialization.to_bytes(state))
    return serialization.from_bytes(_initial_state(), path.read_bytes())


@pytest.mark.parametrize(
    "roundtrip", [_orbax_roundtrip, _msgpack_roundtrip], ids=["orbax", "msgpack"]
)
def test_resumed_training_is_bit_identical(roundtrip, uninterrupted, tmp_path):
    half = _train(_initial_state(), 0, SPLIT)
    restored = roundtrip(half, tmp_path)
    _assert_bitwise_equal(restored, half)
    _assert_bitwise_equal(_train(restored, SPLIT, STEPS), uninterrupted)


# --- checkpoints written by flax.linen.BatchNorm -----------------------------------


class Block(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        return self.norm(use_running_average=not train, name="norm")(x)


def _flax_checkpoint():
    """msgpack bytes of a Block with flax.linen.BatchNorm after two training steps."""
    x = jax.random.normal(jax.random.key(2), (16, 3)) * 3 + 2
    block = Block(nn.BatchNorm)
    variables = block.init(jax.random.key(3), x, False)
    for i in range(2):
        _, upd = block.apply(variables, x + i, True, mutable=["batch_stats"])
        variables = {**variables, **upd}
    return x, variables, serialization.to_bytes(variables)


@pytest.mark.parametrize("norm", [jaxrenorm.linen.BatchNorm, jaxrenorm.linen.BatchRenorm])
def test_flax_batch_norm_checkpoint_loads(norm):
    x, flax_variables, data = _flax_checkpoint()
    restored = serialization.msgpack_restore(data)
    assert "steps" not in restored["batch_stats"]["norm"]
    block, flax_block = Block(norm), Block(nn.BatchNorm)
    # Inference: the same output; BatchRenorm reads the absent `steps` as 0.
    np.testing.assert_allclose(
        block.apply(restored, x, False), flax_block.apply(flax_variables, x, False), atol=1e-5
    )
    # Training continues; with the default (paper) schedule step 0 is plain BatchNorm.
    y, upd = block.apply(restored, x, True, mutable=["batch_stats"])
    y_flax, upd_flax = flax_block.apply(flax_variables, x, True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_flax, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            upd["batch_stats"]["norm"][name], upd_flax["batch_stats"]["norm"][name], rtol=1e-6
        )
    if norm is jaxrenorm.linen.BatchRenorm:
        assert upd["batch_stats"]["norm"]["steps"].dtype == jnp.int32
        assert int(upd["batch_stats"]["norm"]["steps"]) == 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_checkpoint_without_running_statistics_is_refused(train):
    x, _, data = _flax_checkpoint()
    restored = serialization.msgpack_restore(data)
    del restored["batch_stats"]["norm"]["var"]
    block = Block(jaxrenorm.linen.BatchRenorm)
    with pytest.raises(ValueError, match=r"BatchRenorm 'norm'.*no batch_stats \['var'\]"):
        block.apply(restored, x, train, mutable=["batch_stats"] if train else False)
    with pytest.raises(ValueError, match=r"no batch_stats \['mean', 'var'\]"):
        block.apply({"params": restored["params"]}, x, train, mutable=["batch_stats"])
