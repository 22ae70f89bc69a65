"""jaxrenorm.interop, and parity with torch.nn.BatchNorm2d (skipped without torch)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm
from jaxrenorm import interop


def test_momentum_conversions():
    assert interop.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert interop.momentum_to_torch(0.99) == pytest.approx(0.01)
    assert interop.momentum_to_torch(interop.momentum_from_torch(0.3)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="momentum=None"):
        interop.momentum_from_torch(None)
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0.0, 1.0\], got 1.5"):
        interop.momentum_from_torch(1.5)


def test_from_state_dict_of_numpy_arrays():
    rng = np.random.default_rng(0)
    sd = {
        "bn.weight": rng.normal(size=4),
        "bn.bias": rng.normal(size=4),
        "bn.running_mean": rng.normal(size=4),
        "bn.running_var": rng.uniform(1, 2, 4),
        "bn.num_batches_tracked": np.array(3),
    }
    params, stats = interop.from_torch_batch_norm(sd, prefix="bn.")
    np.testing.assert_allclose(params["scale"], sd["bn.weight"], rtol=1e-7)
    np.testing.assert_allclose(stats["var"], sd["bn.running_var"], rtol=1e-7)
    assert all(v.dtype == jnp.float32 for v in (*params.values(), *stats.values()))
    # No affine parameters: no scale, no bias.
    params, _ = interop.from_torch_batch_norm({k[3:]: v for k, v in sd.items() if "running" in k})
    assert params == {}
    with pytest.raises(ValueError, match="track_running_stats"):
        interop.from_torch_batch_norm({"weight": np.ones(2), "bias": np.ones(2)})
    with pytest.raises(ValueError, match="different shapes"):
        interop.from_torch_batch_norm(
            {"weight": np.ones(3), "running_mean": np.ones(2), "running_var": np.ones(2)}
        )


def test_torch_batch_norm_2d_parity_over_training_steps():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    params, stats = interop.from_torch_batch_norm(layer.state_dict())
    rng = np.random.default_rng(1)
    layer.train()
    for step in range(4):
        x = (rng.normal(size=(6, 3, 5, 5)) * (step + 1) + step).astype(np.float32)
        y_torch = layer(torch.from_numpy(x)).detach().numpy()
        y, stats = jaxrenorm.batch_norm(
            jnp.asarray(x),
            params,
            stats,
            use_running_average=False,
            axis=1,
            momentum=interop.momentum_from_torch(0.1),
            epsilon=1e-5,
            bessel_correction=True,
        )
        np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"], layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], layer.running_var.numpy(), rtol=1e-5)
    layer.eval()
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    y, _ = jaxrenorm.batch_norm(jnp.asarray(x), params, stats, use_running_average=True, axis=1)
    np.testing.assert_allclose(y, layer(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    # And a model trained in torch continues in jaxrenorm from its state dict.
    _, imported = interop.from_torch_batch_norm(layer.state_dict())
    np.testing.assert_allclose(imported["var"], stats["var"], rtol=1e-5)


def test_imported_statistics_do_not_alias_torch_buffers():
    torch = pytest.importorskip("torch")
    layer = torch.nn.BatchNorm1d(2)
    _, stats = interop.from_torch_batch_norm(layer.state_dict())
    layer.train()
    layer(torch.randn(8, 2) + 5)  # updates running_mean in place
    np.testing.assert_array_equal(stats["mean"], 0.0)
