"""jaxrenorm.tools: diagnostics collected from BatchRenorm(diagnostics=True)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxrenorm
from tests import reference


def _hand_made():
    """Two features with running mean 0 and variance 1 (epsilon 0).

    Feature 0: batch mean 0, std 2 -> r = 2 (clipped to 1.5), d = 0.
    Feature 1: batch mean 3, std 1 -> r = 1, d = 3 (clipped to 1).
    """
    return jnp.asarray([[-2.0, 2.0], [2.0, 4.0]])


def test_diagnostics_values_on_a_hand_made_case():
    brn = jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=1.0, epsilon=0.0, diagnostics=True)
    x = _hand_made()
    variables = brn.init(jax.random.key(0), x, use_running_average=False)
    assert "intermediates" not in variables  # nothing is sown while initializing
    _, upd = brn.apply(
        variables, x, use_running_average=False, mutable=["batch_stats", "intermediates"]
    )
    d = jaxrenorm.collect_diagnostics(upd["intermediates"])
    assert {k: float(v) for k, v in d.items()} == pytest.approx(
        {"r_clipped": 0.5, "d_clipped": 0.5, "r_mean_abs_dev": 0.25, "d_mean_abs": 0.5}
    )


def test_diagnostics_paths_shapes_and_repeated_calls():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            shared = jaxrenorm.linen.BatchRenorm(
                r_max=1.5, d_max=1.0, epsilon=0.0, diagnostics=True, use_running_average=False
            )
            x = shared(shared(x))  # called twice: the summaries are averaged
            other = jaxrenorm.linen.BatchRenorm(
                r_max=3.0, d_max=5.0, diagnostics=True, use_running_average=False, name="last"
            )
            return other(x)

    x = _hand_made()
    variables = Model().init(jax.random.key(0), x)
    _, upd = jax.jit(lambda v, x: Model().apply(v, x, mutable=["batch_stats", "intermediates"]))(
        variables, x
    )
    d = jaxrenorm.collect_diagnostics(upd)
    assert sorted(d) == sorted(
        f"{layer}/{name}"
        for layer in ("BatchRenorm_0", "last")
        for name in ("r_clipped", "d_clipped", "r_mean_abs_dev", "d_mean_abs")
    )
    assert all(v.shape == () for v in d.values())
    assert len(upd["intermediates"]["BatchRenorm_0"]["r_clipped"]) == 2
    np.testing.assert_allclose(
        d["BatchRenorm_0/r_clipped"],
        np.mean([float(v) for v in upd["intermediates"]["BatchRenorm_0"]["r_clipped"]]),
    )


def test_diagnostics_off_sow_nothing_and_eval_sows_nothing():
    x = _hand_made()
    for module, train in (
        (jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=1.0), True),
        (jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=1.0, diagnostics=True), False),
    ):
        variables = module.init(jax.random.key(0), x, use_running_average=not train)
        _, upd = module.apply(
            variables, x, use_running_average=not train, mutable=["batch_stats", "intermediates"]
        )
        assert jaxrenorm.collect_diagnostics(upd) == {}


# --- recalibrate ------------------------------------------------------------------


def _pooled(chunks, masks=None):
    """float64 mean and biased variance over all valid rows of all chunks."""
    x = np.concatenate([np.asarray(c, np.float64).reshape(-1, c.shape[-1]) for c in chunks])
    if masks is None:
        return x.mean(0), x.var(0)
    m = np.concatenate(
        [
            np.broadcast_to(mk, c.shape).reshape(-1, c.shape[-1])
            for mk, c in zip(masks, chunks, strict=True)
        ]
    )
    n = m.sum(0)
    mean = (x * m).sum(0) / n
    return mean, (((x - mean) ** 2) * m).sum(0) / n


def test_recalibrate_one_layer_unequal_batches_offset_data():
    rng = np.random.default_rng(0)
    chunks = [jnp.asarray(rng.normal(size=(b, 5, 3)) * 2 + 1e3, jnp.float32) for b in (7, 32, 1)]
    bn = jaxrenorm.linen.BatchRenorm(r_max=2.0, d_max=1.0)
    variables = bn.init(jax.random.key(0), chunks[0], use_running_average=True)
    new = jaxrenorm.recalibrate(bn, variables, chunks, use_running_average=False)
    mean, var = _pooled(chunks)
    np.testing.assert_allclose(new["batch_stats"]["mean"], mean, rtol=1e-7)
    np.testing.assert_allclose(new["batch_stats"]["var"], var, rtol=1e-4)
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    for a, b in zip(
        jax.tree.leaves(new["params"]), jax.tree.leaves(variables["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_recalibrate_with_masks_counts_valid_elements():
    rng = np.random.default_rng(1)
    chunks = [jnp.asarray(rng.normal(size=(b, 2)) * 3 + 2, jnp.float32) for b in (6, 10)]
    masks = [rng.random((b, 1)) < 0.5 for b in (6, 10)]
    masks[0][0] = True

    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x, mask, train):
            return jaxrenorm.linen.BatchNorm(use_running_average=not train)(x, mask=mask)

    model = Masked()
    variables = model.init(jax.random.key(0), chunks[0], masks[0], False)
    new = jaxrenorm.recalibrate(
        model, variables, [(c, m) for c, m in zip(chunks, masks, strict=True)], train=True
    )
    mean, var = _pooled(chunks, masks)
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-5)


def test_recalibrate_two_layers_against_the_reference():
    """Upstream layers in training mode: layer 2 sees layer 1's batch-normalized output."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 4))

    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = jaxrenorm.linen.BatchNorm(use_running_average=not train)(x)
            x = x @ jnp.asarray(w, jnp.float32) + 1.0
            return jaxrenorm.linen.BatchRenorm(use_running_average=not train, r_max=1.5, d_max=0.5)(
                x
            )

    chunks = [jnp.asarray(rng.normal(size=(b, 3)) * 2 - 1, jnp.float32) for b in (16, 24)]
    model = TwoLayers()
    variables = model.init(jax.random.key(0), chunks[0], False)
    new = jaxrenorm.recalibrate(model, variables, chunks, train=True)
    params = variables["params"]["BatchNorm_0"]
    hidden = []
    for c in chunks:
        ref = reference.normalize(
            np.asarray(c, np.float64),
            params["scale"],
            params["bias"],
            np.zeros(3),
            np.ones(3),
            np.zeros(c.shape),
        )
        hidden.append(ref.y @ w + 1.0)
    for layer, data in (("BatchNorm_0", chunks), ("BatchRenorm_0", hidden)):
        mean, var = _pooled(data)
        np.testing.assert_allclose(new["batch_stats"][layer]["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["batch_stats"][layer]["var"], var, rtol=1e-5)
    assert "steps" not in new["batch_stats"]["BatchRenorm_0"]


def test_recalibrate_keeps_the_steps_counter_and_refuses_models_without_layers():
    x = jnp.ones((8, 2))
    brn = jaxrenorm.linen.BatchRenorm()
    variables = brn.init(jax.random.key(0), x, use_running_average=True)
    variables["batch_stats"]["steps"] = jnp.int32(123)
    new = jaxrenorm.recalibrate(brn, variables, [x], use_running_average=False)
    assert int(new["batch_stats"]["steps"]) == 123
    dense = nn.Dense(2)
    with pytest.raises(ValueError, match="no jaxrenorm normalization layer"):
        jaxrenorm.recalibrate(dense, dense.init(jax.random.key(0), x), [x])


# --- fold_batch_norm ----------------------------------------------------------------


@pytest.mark.parametrize("layer", ["dense", "conv"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_batch_norm(layer, use_bias):
    rng = np.random.default_rng(3)
    features = 5
    module = (
        nn.Dense(features, use_bias=use_bias)
        if layer == "dense"
        else nn.Conv(features, (3, 3), use_bias=use_bias)
    )
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 3) if layer == "conv" else (4, 3)), jnp.float32)
    lin_vars = module.init(jax.random.key(0), x)
    p = lin_vars["params"]
    norm_params = {"scale": rng.uniform(0.5, 2, features), "bias": rng.normal(size=features)}
    stats = {"mean": rng.normal(size=features), "var": rng.uniform(0.1, 3, features)}
    z = module.apply(lin_vars, x)
    y = reference.normalize(
        np.asarray(z, np.float64),
        norm_params["scale"],
        norm_params["bias"],
        stats["mean"],
        stats["var"],
        np.zeros(z.shape),
        train=False,
    ).y
    kernel, bias = jaxrenorm.fold_batch_norm(p["kernel"], p.get("bias"), norm_params, stats)
    folded = (nn.Dense(features) if layer == "dense" else nn.Conv(features, (3, 3))).apply(
        {"params": {"kernel": kernel, "bias": bias}}, x
    )
    np.testing.assert_allclose(folded, y, rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_checks_shapes():
    pattern = r'batch_stats\["mean"\].*\(4,\).*kernel.*feature shape \(3,\)'
    with pytest.raises(ValueError, match=pattern):
        jaxrenorm.fold_batch_norm(
            jnp.ones((2, 3)), None, {}, {"mean": jnp.zeros(4), "var": jnp.ones(3)}
        )


# --- batch_dependence ---------------------------------------------------------------


def test_batch_dependence_separates_train_and_eval():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(8)(x)
            x = jaxrenorm.linen.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2)(nn.relu(x))

    x = jax.random.normal(jax.random.key(0), (16, 4)) * 2 + 1
    net = Net()
    variables = net.init(jax.random.key(1), x, False)
    key = jax.random.key(2)
    in_eval = jaxrenorm.batch_dependence(lambda x: net.apply(variables, x, False), x, key=key)
    in_train = jaxrenorm.batch_dependence(
        lambda x: net.apply(variables, x, True, mutable=["batch_stats"])[0], x, key=key
    )
    assert in_eval < 1e-5
    assert in_train > 0.1
    with pytest.raises(ValueError, match="at least 4"):
        jaxrenorm.batch_dependence(lambda x: x, x[:2], key=key)


def test_recalibrate_with_batches_sharded_over_devices():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(4)
    chunks = [jnp.asarray(rng.normal(size=(16, 3)) * 2 + 7, jnp.float32) for _ in range(3)]
    sharded = [jax.device_put(c, NamedSharding(mesh, P("data"))) for c in chunks]
    assert len(sharded[0].sharding.device_set) == 8
    bn = jaxrenorm.linen.BatchNorm()
    variables = bn.init(jax.random.key(0), chunks[0], use_running_average=True)
    new = jaxrenorm.recalibrate(bn, variables, sharded, progress=True, use_running_average=False)
    mean, var = _pooled(chunks)
    np.testing.assert_allclose(new["batch_stats"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], var, rtol=1e-5)


# --- pool_moments and the NNX recalibration ------------------------------------------


def test_pool_moments_is_exact_over_parts_with_different_counts():
    """Chan's merge in float64: the moments of the union, not a mean of per-part moments."""
    rng = np.random.default_rng(5)
    parts = [rng.normal(size=(n, 3)) * rng.uniform(0.5, 3) + 1e4 for n in (1, 9, 40)]
    masks = [rng.random(p.shape) < 0.7 for p in parts]
    masks[0][:] = [True, False, True]  # a part where one feature has no valid element
    pooled = None
    for part, mask in zip(parts, masks, strict=True):
        mean, var, count = reference.moments(part, (0,), mask)
        pooled = jaxrenorm.pool_moments(pooled, mean[0], var[0], count[0])
    mean, var = _pooled(parts, masks)
    np.testing.assert_allclose(pooled.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(pooled.var, var, rtol=1e-10)
    np.testing.assert_array_equal(pooled.count, sum(m.sum(0) for m in masks))


class _TwoLayers(nnx.Module):
    def __init__(self, w, rngs):
        self.w = nnx.Param(jnp.asarray(w, jnp.float32))
        self.first = jaxrenorm.nnx.BatchNorm(3, rngs=rngs)
        r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(100)
        self.second = jaxrenorm.nnx.BatchRenorm(4, r_max=r_max, d_max=d_max, rngs=rngs)

    def __call__(self, x, mask=None):
        return self.second(self.first(x, mask=mask) @ self.w[...] + 1.0, mask=mask)


def test_nnx_recalibrate_two_layers_against_the_reference():
    """Training mode: layer 2 sees layer 1's batch-normalized output; nothing else moves."""
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 4))
    model = _TwoLayers(w, nnx.Rngs(0))
    model.first.scale[...] = jnp.asarray([0.5, 1.0, 2.0])
    model.second.steps[...] = 7
    before = nnx.clone(model)
    chunks = [jnp.asarray(rng.normal(size=(b, 3)) * 2 - 1, jnp.float32) for b in (16, 24, 5)]
    assert jaxrenorm.nnx.recalibrate(model, chunks) is model
    hidden = []
    for c in chunks:
        zeros, ones = np.zeros(3), np.ones(3)
        ref = reference.normalize(np.asarray(c, np.float64), [0.5, 1, 2], zeros, zeros, ones, 0 * c)
        hidden.append(ref.y @ w + 1.0)
    for layer, data in ((model.first, chunks), (model.second, hidden)):
        mean, var = _pooled(data)
        np.testing.assert_allclose(layer.mean[...], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.var[...], var, rtol=1e-5)
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(before, nnx.Param))
    assert int(model.second.steps[...]) == 7 and model.first.use_running_average is False


def test_nnx_recalibrate_masks_sharded_batches_and_errors():
    rng = np.random.default_rng(7)
    chunks = [jnp.asarray(rng.normal(size=(16, 3)) * 2 + 7, jnp.float32) for _ in range(3)]
    masks = [jnp.asarray(rng.random((16, 1)) < 0.6) for _ in range(3)]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = [
        tuple(jax.device_put(a, jax.sharding.NamedSharding(mesh, P("data"))) for a in pair)
        for pair in zip(chunks, masks, strict=True)
    ]
    model = _TwoLayers(rng.normal(size=(3, 4)), nnx.Rngs(0))
    jaxrenorm.nnx.recalibrate(model, sharded, progress=True)  # (x, mask) pairs
    full_masks = [np.broadcast_to(m, c.shape) for c, m in zip(chunks, masks, strict=True)]
    mean, var = _pooled(chunks, full_masks)
    np.testing.assert_allclose(model.first.mean[...], mean, rtol=1e-6)
    np.testing.assert_allclose(model.first.var[...], var, rtol=1e-5)
    flax_only = nnx.Sequential(
        nnx.Linear(3, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"jaxrenorm.nnx.convert turns"):
        jaxrenorm.nnx.recalibrate(flax_only, chunks)
