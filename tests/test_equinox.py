"""jaxrenorm.equinox against the float64 reference, the other families and eqx.nn.BatchNorm.

The layers take one example and are batched with `jax.vmap(..., axis_name=...)`;
`batched` below is that vmap. Equinox's own BatchNorm tests promise shapes, a
NameError without a named axis, nested and tuple named axes, normalization,
statistics that move in training and not in inference, gradients, an identity at
inference before any training step, `Sequential`, `delete_init_state` and
serialisation: each is checked here for these layers, in this file's words.
"""

import warnings

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxrenorm  # noqa: E402
from jaxrenorm import equinox as jeqx  # noqa: E402
from tests import reference  # noqa: E402

AXIS = "batch"


def batched(layer, axis_name=AXIS, **call_kwargs):
    """`layer` over a batch: examples on axis 0, the state shared (not batched)."""
    return jax.vmap(
        lambda x, state: layer(x, state, **call_kwargs),
        axis_name=axis_name,
        in_axes=(0, None),
        out_axes=(0, None),
    )


def _data(shape, seed=0, scale=2.0, offset=5.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(offset + scale * rng.normal(size=shape), jnp.float32)


def _eqx_batch_norm(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation of mode="legacy", if any
        return eqx.nn.BatchNorm(*args, **kwargs)


# --- the core: one example per call, the batch on a named axis ------------------------


@pytest.mark.parametrize("renorm", [False, True], ids=["bn", "brn"])
def test_per_example_calls_under_vmap_match_the_reference(renorm):
    """`batch_renorm(x_i, ..., axis_name=...)` per example equals the batch's statistics."""
    x = _data((12, 3), offset=3.0)
    g = _data((12, 3), seed=1, offset=0.0, scale=1.0)
    rng = np.random.default_rng(2)
    scale, bias = rng.normal(size=3), rng.normal(size=3)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    kw = dict(r_max=1.5, d_max=0.5) if renorm else {}
    fn = jaxrenorm.batch_renorm if renorm else jaxrenorm.batch_norm
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}

    @jax.jit
    def run(x, params):
        def one(xi, params):
            return fn(xi, params, stats, use_running_average=False, axis=0, axis_name="b", **kw)

        def loss(x, params):
            y, new = jax.vmap(one, in_axes=(0, None), out_axes=(0, None), axis_name="b")(x, params)
            return jnp.sum(g * y), (y, new)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    (dx, dparams), (y, new) = run(x, params)
    want = reference.normalize(x, scale, bias, mean, var, g, **kw)
    np.testing.assert_allclose(y, want.y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], want.new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], want.new_var, rtol=1e-5)
    np.testing.assert_allclose(dx, want.dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], want.dscale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dparams["bias"], want.dbias, rtol=1e-5, atol=1e-5)


def test_per_example_input_needs_a_named_axis_and_more_than_one_example():
    p, s = None, jaxrenorm.init_batch_stats(3)
    with pytest.raises(ValueError, match="need `axis_name`"):
        jaxrenorm.batch_norm(jnp.ones(3), p, s, use_running_average=False, axis=0)
    one = jax.vmap(
        lambda x: jaxrenorm.batch_norm(x, p, s, use_running_average=False, axis=0, axis_name="b"),
        axis_name="b",
        out_axes=(0, None),
    )
    with pytest.raises(ValueError, match="one value per feature"):
        one(jnp.ones((1, 3)))


# --- the layers against the float64 reference -----------------------------------------


def _debiased(batch_values, momentum, start):
    """The zero-debiased average of per-call values: the EMA from 0, over 1 - m^t."""
    hidden = np.zeros_like(start)
    for b in batch_values:
        hidden = momentum * hidden + (1 - momentum) * b
    return hidden / (1 - momentum ** len(batch_values))


@pytest.mark.parametrize("kind", ["bn", "brn", "irn"])
def test_layers_train_and_evaluate_like_the_reference(kind):
    """Three training calls (outputs, gradients, debiased statistics), then inference."""
    cls = {"bn": jeqx.BatchNorm, "brn": jeqx.BatchRenorm, "irn": jeqx.InstanceRenorm}[kind]
    kw = {} if kind == "bn" else dict(r_max=1.5, d_max=0.5)
    layer, state = eqx.nn.make_with_state(cls)(3, AXIS, momentum=0.9, **kw)
    rng = np.random.default_rng(0)
    layer = eqx.tree_at(
        lambda l: (l.weight, l.bias),
        layer,
        tuple(jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(2)),
    )
    if kind == "irn":
        layer = eqx.tree_at(lambda l: l.rho, layer, jnp.asarray([0.2, 0.5, 0.9], jnp.float32))

    @eqx.filter_jit
    def step(layer, state, x, g):
        def loss(layer_and_x):
            y, new_state = batched(layer_and_x[0])(layer_and_x[1], state)
            return jnp.sum(g * y), (y, new_state)

        return eqx.filter_grad(loss, has_aux=True)((layer, x))

    weight, bias = np.asarray(layer.weight), np.asarray(layer.bias)
    means, variances = [], []
    mean, var = np.zeros(3), np.ones(3)  # the state before any training call
    for t in range(3):
        x = _data((6, 3, 4), seed=t, offset=2.0 * t)  # (batch, channels, length)
        g = _data((6, 3, 4), seed=10 + t, offset=0.0, scale=1.0)
        (dlayer, dx), (y, state) = step(layer, state, x, g)
        # The reference takes channels last; the running values are those before the call.
        xt, gt = np.moveaxis(np.asarray(x), 1, -1), np.moveaxis(np.asarray(g), 1, -1)
        if kind == "irn":
            want = reference.instance_renorm(
                xt, weight, bias, np.asarray(layer.rho), mean, var, gt, momentum=0.0, **kw
            )
        else:
            want = reference.normalize(xt, weight, bias, mean, var, gt, momentum=0.0, **kw)
        np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), want.y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            np.moveaxis(np.asarray(dx), 1, -1), want.dx, rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(dlayer.weight, want.dscale, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dlayer.bias, want.dbias, rtol=1e-4, atol=1e-4)
        means.append(want.new_mean)  # momentum 0: the batch's own statistics
        variances.append(want.new_var)
        mean, var = _debiased(means, 0.9, mean), _debiased(variances, 0.9, var)
        got_mean, got_var = state.get(layer.state_index)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
        assert int(state.get(layer.steps_index)) == t + 1
    x = _data((6, 3, 4), seed=7)
    y, same = batched(eqx.nn.inference_mode(layer))(x, state)
    xt = np.moveaxis(np.asarray(x), 1, -1)
    if kind == "irn":
        want = reference.instance_renorm(
            xt, weight, bias, np.asarray(layer.rho), mean, var, xt, train=False
        )
    else:
        want = reference.normalize(xt, weight, bias, mean, var, xt, train=False)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), want.y, rtol=1e-4, atol=1e-4)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, same, state))


def test_debiased_variance_starts_at_zero_where_equinox_overestimates_it():
    """Three training calls on 5 + 2 N(0, 1): inference outputs of standard deviation 1.

    eqx.nn.BatchNorm(mode="batch") starts its hidden variance at 1 and debiases it
    like the mean, so the same run evaluates with a variance about ten times too
    large (outputs of standard deviation about 0.3).
    """
    x = _data((64, 4), seed=3)
    ours, state = eqx.nn.make_with_state(jeqx.BatchNorm)(4, AXIS, mode="batch")
    theirs = _eqx_batch_norm(4, AXIS, mode="batch")
    their_state = eqx.nn.State(theirs)
    for _ in range(3):
        _, state = batched(ours)(x, state)
        _, their_state = batched(theirs)(x, their_state)
    y, _ = batched(eqx.nn.inference_mode(ours))(x, state)
    y_theirs, _ = batched(eqx.nn.inference_mode(theirs))(x, their_state)
    assert abs(float(jnp.std(y)) - 1) < 1e-3
    assert float(jnp.std(y_theirs)) < 0.5  # Equinox 0.13: ~0.33


def test_debiased_running_averages_agree_in_every_family():
    """Equinox's mode="batch", linen's and NNX's `debias_running_average=True`, and
    the pure function with `jaxrenorm.debiased_momentum`, against the debiased
    average of the batches' statistics (the reference's, momentum 0)."""
    batches = [_data((16, 3), seed=s, offset=2.0 * s) for s in range(3)]
    m = 0.9
    linen_layer = jaxrenorm.linen.BatchNorm(
        use_running_average=False, momentum=m, debias_running_average=True
    )
    variables = linen_layer.init(jax.random.key(0), batches[0])
    nnx_layer = jaxrenorm.nnx.BatchNorm(
        3, momentum=m, debias_running_average=True, rngs=nnx.Rngs(0)
    )
    eqx_layer, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, AXIS, momentum=m)
    pure_stats = jaxrenorm.init_batch_stats(3)
    means, variances = [], []
    for t, x in enumerate(batches):
        _, upd = linen_layer.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **upd}
        nnx_layer(x)
        _, state = batched(eqx_layer)(x, state)
        momentum = jaxrenorm.debiased_momentum(m, t)
        _, pure_stats = jaxrenorm.batch_norm(
            x, None, pure_stats, use_running_average=False, momentum=momentum
        )
        ref = reference.normalize(
            x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), x, momentum=0.0
        )
        means.append(ref.new_mean)
        variances.append(ref.new_var)
        want_mean, want_var = _debiased(means, m, 0), _debiased(variances, m, 0)
        stats = variables["batch_stats"]
        assert int(stats["steps"]) == int(nnx_layer.steps[...]) == t + 1
        for mean, var in (
            (stats["mean"], stats["var"]),
            (nnx_layer.mean[...], nnx_layer.var[...]),
            state.get(eqx_layer.state_index),
            (pure_stats["mean"], pure_stats["var"]),
        ):
            np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(var, want_var, rtol=1e-5)


def test_ema_mode_starts_at_the_first_batch_then_decays():
    x1, x2 = _data((32, 2), seed=0), _data((32, 2), seed=1, offset=-3.0)
    layer, state = eqx.nn.make_with_state(jeqx.BatchNorm)(2, AXIS, momentum=0.8, mode="ema")
    _, state = batched(layer)(x1, state)
    np.testing.assert_allclose(state.get(layer.ema_state_index)[0], x1.mean(0), rtol=1e-5)
    _, state = batched(layer)(x2, state)
    want = 0.8 * x1.mean(0) + 0.2 * x2.mean(0)
    np.testing.assert_allclose(state.get(layer.ema_state_index)[0], want, rtol=1e-5, atol=1e-6)
    assert layer.batch_state_index is None and layer.state_index is layer.ema_state_index


def test_scalar_mask_leaves_examples_out_of_the_statistics():
    x = _data((10, 3, 5), seed=4)
    keep = jnp.arange(10) % 3 != 0
    layer, state = eqx.nn.make_with_state(jeqx.BatchRenorm)(3, AXIS, r_max=2.0, d_max=1.0)
    masked = jax.vmap(
        lambda x, m, s: layer(x, s, mask=m),
        axis_name=AXIS,
        in_axes=(0, 0, None),
        out_axes=(0, None),
    )
    y, s1 = masked(x, keep, state)
    y_kept, s2 = batched(layer)(x[keep], state)
    np.testing.assert_allclose(y[keep], y_kept, rtol=1e-5, atol=1e-5)
    for a, b in zip(s1.get(layer.state_index), s2.get(layer.state_index), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- the same model in linen, NNX and Equinox ------------------------------------------


def test_linen_nnx_and_equinox_agree_over_training_steps():
    """BatchRenorm between two linear maps, 3 SGD steps: outputs, statistics, gradients.

    Equinox's state starts where the Flax layers' does, with its counter at 1 and
    mode="ema", so that its running averages follow Flax's recursion exactly.
    """
    rng = np.random.default_rng(0)
    w_in = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    start_mean, start_var = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.5, 0.5, 3.0])
    kw = dict(momentum=0.9, r_max=1.5, d_max=0.5)
    batches = [_data((8, 4), seed=s, offset=float(s)) for s in range(3)]

    def loss_of(y):
        return jnp.sum(jnp.tanh(y @ w_out))

    # linen
    linen_layer = jaxrenorm.linen.BatchRenorm(use_running_average=False, **kw)
    variables = linen_layer.init(jax.random.key(0), batches[0] @ w_in)
    params = variables["params"]
    stats = {"mean": start_mean, "var": start_var}

    @jax.jit
    def linen_step(params, stats, x):
        def loss(params, x):
            y, upd = linen_layer.apply(
                {"params": params, "batch_stats": stats}, x @ w_in, mutable=["batch_stats"]
            )
            return loss_of(y), (y, upd["batch_stats"])

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    # NNX
    nnx_layer = jaxrenorm.nnx.BatchRenorm(3, rngs=nnx.Rngs(0), **kw)
    nnx_layer.mean[...], nnx_layer.var[...] = start_mean, start_var

    @nnx.jit
    def nnx_step(layer, x):
        def loss(layer, x):
            y = layer(x @ w_in)
            return loss_of(y), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    # Equinox
    eqx_layer, state = eqx.nn.make_with_state(jeqx.BatchRenorm)(3, AXIS, mode="ema", **kw)
    state = state.set(eqx_layer.state_index, (start_mean, start_var))
    state = state.set(eqx_layer.steps_index, jnp.ones((), jnp.int32))

    @eqx.filter_jit
    def eqx_step(layer, state, x):
        def loss(layer_and_x):
            y, new_state = batched(layer_and_x[0])(layer_and_x[1] @ w_in, state)
            return loss_of(y), (y, new_state)

        return eqx.filter_grad(loss, has_aux=True)((layer, x))

    for x in batches:
        (g_linen, dx_linen), (y_linen, stats) = linen_step(params, stats, x)
        (g_nnx, dx_nnx), y_nnx = nnx_step(nnx_layer, x)
        (g_eqx, dx_eqx), (y_eqx, state) = eqx_step(eqx_layer, state, x)
        for y in (y_nnx, y_eqx):
            np.testing.assert_allclose(y, y_linen, rtol=1e-5, atol=1e-5)
        for dx in (dx_nnx, dx_eqx):
            np.testing.assert_allclose(dx, dx_linen, rtol=1e-4, atol=1e-5)
        for scale, bias in ((g_nnx.scale[...], g_nnx.bias[...]), (g_eqx.weight, g_eqx.bias)):
            np.testing.assert_allclose(scale, g_linen["scale"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(bias, g_linen["bias"], rtol=1e-4, atol=1e-5)
        eqx_mean, eqx_var = state.get(eqx_layer.state_index)
        for mean, var in ((nnx_layer.mean[...], nnx_layer.var[...]), (eqx_mean, eqx_var)):
            np.testing.assert_allclose(mean, stats["mean"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(var, stats["var"], rtol=1e-5)
        # The same SGD step on the parameters of each.
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g_linen)
        nnx_layer.scale[...] -= 0.1 * g_nnx.scale[...]
        nnx_layer.bias[...] -= 0.1 * g_nnx.bias[...]
        eqx_layer = eqx.tree_at(
            lambda l: (l.weight, l.bias),
            eqx_layer,
            (eqx_layer.weight - 0.1 * g_eqx.weight, eqx_layer.bias - 0.1 * g_eqx.bias),
        )


# --- what Equinox's own BatchNorm tests promise ----------------------------------------


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_equinox_batch_norm_promises(mode):
    layer = jeqx.BatchNorm(5, AXIS, mode=mode)
    state = eqx.nn.State(layer)
    for shape in ((10, 5), (10, 5, 6), (10, 5, 7, 8)):
        y, state = batched(layer)(_data(shape), state)
        assert y.shape == shape
        assert all(v.shape == (5,) for v in state.get(layer.state_index))
    # No named axis: a NameError, batched or not.
    with pytest.raises(NameError):
        jax.vmap(layer, in_axes=(0, None), out_axes=(0, None))(_data((10, 5)), state)
    with pytest.raises(NameError):
        layer(_data((5,)), state)
    # Inside another vmap without a name: one state per outer index.
    x2 = _data((10, 5, 6))
    inner = jax.vmap(layer, axis_name=AXIS, in_axes=(1, None), out_axes=(1, None))
    y, outer_state = jax.vmap(inner, in_axes=(0, None))(x2, state)
    assert y.shape == x2.shape
    assert all(v.shape == (10, 5) for v in outer_state.get(layer.state_index))
    # Two named axes, from two nested vmaps.
    two = jeqx.BatchNorm(6, ("batch1", "batch2"), mode=mode)
    call = two
    for name in ("batch1", "batch2"):
        call = jax.vmap(call, axis_name=name, in_axes=(0, None), out_axes=(0, None))
    x = _data((10, 5, 6))
    y, two_state = call(x, eqx.nn.State(two))
    want = (x - x.mean((0, 1))) / jnp.sqrt(x.var((0, 1)) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-6)
    assert all(v.shape == (6,) for v in two_state.get(two.state_index))
    # Statistics move in training, not in inference; gradients flow.
    plain = jeqx.BatchNorm(5, AXIS, channelwise_affine=False, mode=mode)
    state = eqx.nn.State(plain)
    _, state = batched(plain)(_data((10, 5), seed=1), state)
    before = state.get(plain.state_index)
    _, state = batched(plain)(3 * _data((10, 5), seed=2) + 10, state)
    after = state.get(plain.state_index)
    assert not any(np.allclose(a, b) for a, b in zip(before, after, strict=True))
    _, unchanged = batched(eqx.nn.inference_mode(plain))(_data((10, 5), seed=3), state)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, unchanged, state))
    grad = jax.grad(lambda x: jnp.sum(batched(plain)(x, state)[0] ** 3))(_data((4, 5)))
    assert grad.shape == (4, 5) and bool(jnp.all(jnp.isfinite(grad)))


def test_inference_before_training_is_the_identity():
    layer, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, "foo", mode="batch", inference=True)
    x = _data((5, 3), offset=0.0)
    y, _ = batched(layer, axis_name="foo")(x, state)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_sequential_state_deletion_and_serialisation(tmp_path):
    key1, key2 = jax.random.split(jax.random.key(0))
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=key1),
            jeqx.BatchRenorm(4, AXIS, r_max=2.0, d_max=1.0),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(4, 3, key=key2),
        ]
    )
    state = eqx.nn.State(seq)
    y, state = batched(seq)(_data((6, 2)), state)
    assert y.shape == (6, 3) and int(state.get(seq[1].steps_index)) == 1
    # `delete_init_state` drops the three initial values the layer holds.
    arrays = [a for a in jax.tree.leaves(seq) if eqx.is_array(a)]
    kept = [a for a in jax.tree.leaves(eqx.nn.delete_init_state(seq)) if eqx.is_array(a)]
    assert len(arrays) == len(kept) + 3
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (seq, state))
    like = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=key2),
            jeqx.BatchRenorm(4, AXIS, r_max=2.0, d_max=1.0),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(4, 3, key=key1),
        ]
    )
    restored, restored_state = eqx.tree_deserialise_leaves(path, (like, eqx.nn.State(like)))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(seq), strict=True):
        assert not eqx.is_array(a) or np.array_equal(a, b)
    y2, _ = batched(eqx.nn.inference_mode(restored))(_data((6, 2)), restored_state)
    y1, _ = batched(eqx.nn.inference_mode(seq))(_data((6, 2)), state)
    np.testing.assert_array_equal(y1, y2)


# --- transforms, promotion rules, data parallel ---------------------------------------


def test_filter_vmap_ensemble_keeps_separate_statistics():
    members = eqx.filter_vmap(lambda _: jeqx.BatchNorm(3, AXIS), axis_size=2)(jnp.arange(2))
    state = eqx.filter_vmap(eqx.nn.State, axis_size=2)(members)
    x = jnp.stack([_data((8, 3), seed=0), _data((8, 3), seed=1, offset=-4.0)])

    @eqx.filter_vmap
    def train(member, state, x):
        return batched(member)(x, state)

    _, state = train(members, state, x)
    mean, _ = state.get(members.state_index)
    np.testing.assert_allclose(mean, x.mean(1), rtol=1e-5, atol=1e-5)


def test_every_family_accepts_half_precision_under_strict_promotion():
    """float16 input, float32 parameters, strict dtype and raise-on-rank promotion."""
    x = _data((8, 3), offset=1.0).astype(jnp.float16)
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        for fn in (jaxrenorm.batch_norm, jaxrenorm.batch_renorm):
            y, _ = fn(x, None, jaxrenorm.init_batch_stats(3), use_running_average=False)
            assert y.dtype == jnp.float16
        linen_layer = jaxrenorm.linen.BatchRenorm(use_running_average=False)
        variables = linen_layer.init(jax.random.key(0), x)
        y, _ = linen_layer.apply(variables, x, mutable=["batch_stats"])
        assert y.dtype == jnp.float32  # promoted with the float32 parameters, as in Flax
        y = jaxrenorm.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))(x)
        assert y.dtype == jnp.float32
        layer, state = eqx.nn.make_with_state(jeqx.BatchRenorm)(3, AXIS)
        y, state = batched(layer)(x, state)
        assert y.dtype == jnp.float32
        grad = jax.grad(lambda x: jnp.sum(batched(layer)(x, state)[0]))(x)
        assert grad.dtype == jnp.float16
    with pytest.raises(jax.dtypes.TypePromotionError), jax.numpy_dtype_promotion("strict"):
        nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)  # Flax's raises


def test_shard_map_and_sharded_jit_use_one_collective_per_layer():
    """Per-example layers vmapped on each device's examples, statistics over every device."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    layer, state = eqx.nn.make_with_state(jeqx.BatchRenorm)(3, (AXIS, "data"), r_max=1.5, d_max=0.5)
    x = _data((32, 3, 2), seed=5)
    reference_layer = jeqx.BatchRenorm(3, AXIS, r_max=1.5, d_max=0.5)
    y_one, state_one = batched(reference_layer)(x, eqx.nn.State(reference_layer))

    # JAX's varying-axes check rejects a collective over a vmap's axis and a mesh axis
    # together (jax 0.10): the per-example layers need `check_vma=False`.
    @jax.jit
    @jax.shard_map(
        mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P()), check_vma=False
    )
    def per_device(x, state):
        return batched(layer)(x, state)

    y, new_state = per_device(x, state)
    np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        new_state.get(layer.state_index), state_one.get(reference_layer.state_index), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hlo = per_device.lower(x, state).as_text()
    assert hlo.count("all_reduce") + hlo.count("all-reduce") == 1
    # Sharded jit: the batch sharded over the devices, XLA inserts the collectives.
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    y_jit, _ = eqx.filter_jit(batched(reference_layer))(sharded, eqx.nn.State(reference_layer))
    np.testing.assert_allclose(y_jit, y_one, rtol=1e-5, atol=1e-5)


# --- conversion and recalibration ------------------------------------------------------


class _Model(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.Module

    def __call__(self, x, state):
        y, state = self.norm(self.linear(x), state)
        return y, state


def test_convert_carries_equinox_state_and_goes_back():
    key = jax.random.key(0)
    model = _Model(eqx.nn.Linear(4, 3, key=key), _eqx_batch_norm(3, AXIS, mode="batch"))
    state = eqx.nn.State(model)
    batches = [_data((16, 4), seed=s, offset=float(s)) for s in range(3)]
    for x in batches:
        _, state = batched(model)(x, state)
    new, new_state = jeqx.convert(model, state, to=jeqx.BatchRenorm, r_max=1.0, d_max=0.0)
    assert isinstance(new.norm, jeqx.BatchRenorm) and eqx.tree_equal(new.linear, model.linear)
    assert int(new_state.get(new.norm.steps_index)) == 3
    # The debiased averages of the batches' statistics, without Equinox's start at 1.
    batch_stats = [
        (
            np.asarray(b @ model.linear.weight.T + model.linear.bias).mean(0),
            np.asarray(b @ model.linear.weight.T + model.linear.bias).var(0),
        )
        for b in batches
    ]
    mean, var = new_state.get(new.norm.state_index)
    m = 0.99
    np.testing.assert_allclose(mean, _debiased([s[0] for s in batch_stats], m, 0), rtol=1e-4)
    np.testing.assert_allclose(var, _debiased([s[1] for s in batch_stats], m, 0), rtol=1e-3)
    # Back to Equinox, whose state then holds its own biased form, and back again.
    back, back_state = jeqx.convert(new, new_state, to=eqx.nn.BatchNorm)
    assert type(back.norm) is eqx.nn.BatchNorm and back.norm.mode == "batch"
    again, again_state = jeqx.convert(back, back_state, to=jeqx.BatchNorm)
    for a, b in zip(
        again_state.get(again.norm.state_index), new_state.get(new.norm.state_index), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(again_state.get(again.norm.steps_index)) == 3


def test_recalibrate_sets_the_population_statistics():
    key = jax.random.key(1)
    model = _Model(eqx.nn.Linear(4, 3, key=key), jeqx.InstanceRenorm(3, AXIS))
    state = eqx.nn.State(model)
    data = _data((40, 5, 4), seed=9)  # 40 examples of 5 positions, 4 inputs

    def call(model, x, state):
        y, state = model.norm(jax.vmap(model.linear)(x).T, state)
        return y, state

    class Positions(eqx.Module):
        model: _Model

        def __call__(self, x, state):
            return call(self.model, x, state)

    wrapped = Positions(model)
    new_state = jeqx.recalibrate(wrapped, state, [data[:16], data[16:]])
    h = np.asarray(data, np.float64) @ np.asarray(model.linear.weight, np.float64).T
    h = h + np.asarray(model.linear.bias, np.float64)
    mean, var = new_state.get(model.norm.state_index)
    np.testing.assert_allclose(mean, h.mean((0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, h.var((0, 1)), rtol=1e-5)
    assert int(new_state.get(model.norm.steps_index)) == 0  # nothing else changes
