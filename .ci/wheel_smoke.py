"""Run inside a fresh virtual environment where the built wheel (not the source tree)
is installed: the package imports, ships its typing marker, and trains."""

import importlib.resources
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxrenorm

source_tree = pathlib.Path(sys.argv[1]).resolve()
installed = pathlib.Path(jaxrenorm.__file__).resolve()
assert source_tree not in installed.parents, f"imported the source tree: {installed}"
assert importlib.resources.files("jaxrenorm").joinpath("py.typed").is_file(), "py.typed"
assert jaxrenorm.__version__, "no version"


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16)(x)
        x = jaxrenorm.linen.BatchRenorm(use_running_average=not train)(x)
        return nn.Dense(1)(nn.relu(x))


x = jax.random.normal(jax.random.key(0), (64, 4)) * 3 + 10
y = jnp.sum(x - 10, axis=1, keepdims=True) / 6  # about unit scale
model, tx = MLP(), optax.adam(3e-2)
variables = model.init(jax.random.key(1), x, train=False)
params, stats = variables["params"], variables["batch_stats"]
opt_state = tx.init(params)


@jax.jit
def step(params, stats, opt_state):
    def loss_fn(params):
        pred, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean((pred - y) ** 2), upd["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss


losses = []
for _ in range(30):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
assert losses[-1] < 0.5 * losses[0], losses

layer = jaxrenorm.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
out = layer(x)
assert jnp.allclose(out.mean(0), 0.0, atol=1e-4)
print(
    f"jaxrenorm {jaxrenorm.__version__} from {installed.parent}: trained, loss "
    f"{losses[0]:.1f} -> {losses[-1]:.2f}"
)
