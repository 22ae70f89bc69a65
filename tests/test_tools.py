"""jaxrenorm.tools: diagnostics collected from BatchRenorm(diagnostics=True)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm


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
