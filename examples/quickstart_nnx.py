"""Quickstart, Flax NNX version: a small CNN with BatchRenorm on scikit-learn's digits.

The same model and schedule as `quickstart.py`, written with `flax.nnx`:
`jaxrenorm.nnx.BatchRenorm` holds its running statistics and `steps` counter as
`nnx.BatchStat` variables, `nnx.Optimizer` trains the `nnx.Param`s inside an
`nnx.jit` step, and `nnx.view(model, use_running_average=True)` evaluates the
same model with every normalization layer on its running statistics. The data
ships inside scikit-learn; nothing is downloaded.

Run: `python examples/quickstart_nnx.py` (about 10 seconds on 2 CPU cores; prints
the test accuracy, typically 0.97-0.99).
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from quickstart import load_data

import jaxrenorm


class CNN(nnx.Module):
    """Two conv blocks and a classifier, each conv followed by BatchRenorm."""

    def __init__(self, total_steps: int, *, rngs: nnx.Rngs):
        r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(total_steps)
        self.conv1 = nnx.Conv(1, 32, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = jaxrenorm.nnx.BatchRenorm(32, r_max=r_max, d_max=d_max, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = jaxrenorm.nnx.BatchRenorm(64, r_max=r_max, d_max=d_max, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv1(x)))
        x = nnx.relu(self.norm2(self.conv2(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = load_data(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    model = CNN(total_steps, rngs=nnx.Rngs(args.seed))
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, total_steps))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, x, y):
        return jnp.mean(jnp.argmax(model(x), -1) == y)

    # The same variables, with the normalization layers on their running statistics.
    evaluation = nnx.view(model, use_running_average=True)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            losses.append(train_step(model, optimizer, x_train[idx], y_train[idx]))
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            acc = float(accuracy(evaluation, x_test, y_test))
            print(
                f"epoch {epoch + 1:3d}  loss {float(np.mean(losses)):.4f}  "
                f"test accuracy {acc:.4f}  steps {int(model.norm1.steps[...])}"
            )
    acc = float(accuracy(evaluation, x_test, y_test))
    print(f"test accuracy: {acc:.4f} ({time.perf_counter() - start:.1f} s of training)")


if __name__ == "__main__":
    main()
