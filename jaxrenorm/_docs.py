"""One description per argument, for the docstrings of every public layer and function.

The pure functions, the linen modules and the NNX modules share most of their
arguments (`axis`, `momentum`, `virtual_batch_size`, ...). Each is described once
here, in `ARGUMENTS`, and the `Args:` section (a function's parameters, a linen
module's fields, an NNX or Equinox constructor's arguments) of every object
marked `@documents(...)` is written from these descriptions, in the order of the
signature, into the source itself: a reader of the source sees what `help()`,
IDEs and the API pages show. A layer lists the arguments it adds over its base
class first, then those of each base class under a titled section,
`Args: Inherited from BatchNorm:`, which the API pages show like the first, each
argument with its type, default and anchor.

After editing a description or a signature, run

    python -c "import jaxrenorm._docs as d; d.write_sections()"

which rewrites those sections in place; tests/test_docstrings.py fails while any
is out of date, and an argument without a description is a KeyError there.

A description is a string, or a dict from family ("pure", "linen", "nnx",
"equinox"; "module" for every module family, "default" for the others) to
string where the families differ. `{flax}` becomes the layer the family mirrors.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_FLAX = {
    "pure": "flax.linen.BatchNorm",
    "linen": "flax.linen.BatchNorm",
    "nnx": "flax.nnx.BatchNorm",
    "equinox": "eqx.nn.BatchNorm",
}

_MODULE_BOUND = (
    "a float or a schedule `step -> value` (any optax schedule) evaluated at the "
    "layer's `steps` counter, the number of training calls so far."
)

ARGUMENTS: dict[str, str | dict[str, str]] = {
    "x": (
        "the input, real or complex floating point: a batch axis and the features, "
        "with any other axes (spatial, sequence) in between."
    ),
    "params": (
        'the learned per-feature parameters: `{"scale": gamma, "bias": beta}`, each '
        "of the feature shape; a missing key (or None) means no scale or no bias."
    ),
    "batch_stats": (
        'the running statistics, `{"mean": ..., "var": ...}` of the feature shape '
        "(see `init_batch_stats`)."
    ),
    "num_features": "the size of the feature axis (the shape of the parameters and statistics).",
    "use_running_average": {
        "pure": (
            "True normalizes with the running statistics (inference) and returns "
            "`batch_stats` unchanged; False normalizes with the batch's statistics "
            "(training) and returns updated running statistics."
        ),
        "linen": (
            "True normalizes with the running statistics (inference), False with the "
            "batch's, updating the running ones (training). The argument of the call, "
            "if given, takes precedence; one of the two must be set. As in {flax}."
        ),
        "nnx": (
            "True normalizes with the running statistics (inference), False (the "
            "default) with the batch's, updating the running ones (training). The "
            "argument of the call takes precedence; `.train()`, `.eval()` and "
            "`nnx.view(model, use_running_average=...)` set this one. As in {flax}."
        ),
    },
    "axis": {
        "pure": (
            "the feature axis, or a tuple of feature axes: the statistics are "
            "computed over every other axis. Default -1, the last; as in {flax}."
        ),
        "linen": (
            "the feature axis, or a tuple of feature axes: the statistics are "
            "computed over every other axis. Default -1, the last; as in {flax}."
        ),
        "nnx": (
            "the feature axis: the statistics are computed over every other axis. "
            "Default -1, the last; as in {flax}."
        ),
    },
    "momentum": (
        "decay rate of the running statistics, in [0, 1]: "
        "running = momentum * running + (1 - momentum) * batch, the weight of the "
        "old value, as in {flax} (PyTorch's momentum is one minus this: see "
        "`jaxrenorm.interop.momentum_from_torch`)."
    ),
    "epsilon": "a small value added to the variance before the square root, >= 0; as in {flax}.",
    "dtype": {
        "equinox": (
            "the dtype of `weight`, `bias` and the running statistics: float32 by "
            "default (float64 with `jax_enable_x64`), as in {flax}. The output dtype "
            "promotes the input's with the parameters'; the statistics are computed "
            "in at least float32."
        ),
        "pure": (
            "the output dtype (default: the input's). The statistics are computed in "
            "at least float32 whatever the dtype."
        ),
        "linen": (
            "the output dtype; None promotes the input's dtype with the parameters', "
            "as in {flax}. The statistics are computed in at least float32."
        ),
        "nnx": (
            "the output dtype; None promotes the input with the variables through "
            "`promote_dtype`, as in {flax}. The statistics are computed in at least "
            "float32."
        ),
    },
    "param_dtype": {
        "linen": (
            "the dtype of the parameters (`scale`, `bias`, InstanceRenorm's `rho`), "
            "float32 by default, and of the running statistics when "
            "`force_float32_reductions=False`; as in {flax}."
        ),
        "nnx": (
            "the dtype of the parameters (`scale`, `bias`, InstanceRenorm's `rho`), "
            "float32 by default; as in {flax}."
        ),
    },
    "use_bias": "learn a per-feature `bias` (beta) added after normalizing; as in {flax}.",
    "use_scale": (
        "learn a per-feature `scale` (gamma) that multiplies the normalized input; as in {flax}."
    ),
    "bias_init": "the initializer of `bias` (zeros by default); as in {flax}.",
    "scale_init": "the initializer of `scale` (ones by default); as in {flax}.",
    "axis_name": {
        "default": (
            "the named axis, or tuple of axis names, of a `pmap`, `shard_map` or `vmap` "
            "whose devices share the statistics of the global batch, computed with one "
            "collective per layer, a gather of a few values per feature and device (and "
            "one more in the backward pass); as in "
            "{flax}. Not needed under `jit` with a sharded batch, where XLA inserts the "
            "collectives. Each device's moments are about a sample of its own data and "
            "are merged exactly, so the result is as accurate as on one device whatever "
            "the running statistics of the devices hold (they may differ, as in a "
            "`vmap`ped ensemble)."
        ),
        "equinox": (
            "the named axis, or tuple of axis names, of the `vmap` (or `pmap`, "
            "`shard_map`) whose examples share the statistics, computed with one "
            "collective over those axes; as in {flax}. Each device's moments are "
            "about a sample of its own data and are merged exactly."
        ),
    },
    "axis_index_groups": {
        "default": (
            "groups of device indices along `axis_name`, each normalized with its own "
            "statistics (e.g. `[[0, 1], [2, 3]]`); as in {flax}."
        ),
        "equinox": (
            "groups of indices along `axis_name` (a `pmap`'s), each normalized with "
            "its own statistics (e.g. `[[0, 1], [2, 3]]`); `vmap` has no groups."
        ),
    },
    "mask": (
        "a boolean array broadcastable to `x`: the statistics use the True positions "
        "only, weighted by their number on each device. False positions may hold NaN "
        "or Inf: they reach neither the statistics nor any gradient, and their "
        "outputs are finite. Left padding is as accurate as right padding: the "
        "one-pass variance shifts by each group's first valid element. A feature with "
        "no valid element keeps its running statistics and is normalized with them."
    ),
    "use_fast_variance": {
        "default": (
            "True (the default, as in {flax}) computes the variance in one pass, shifted "
            "by a sample of the data so that it stays accurate on offset data, where "
            "Flax's one-pass E[x^2] - E[x]^2 is not (x = 1e4 + N(0, 1) in float32: "
            "relative error 1e-7 against 23). False computes the exact two-pass "
            "variance, at the cost of a second pass over the data (the collective with "
            "`axis_name` stays one)."
        ),
        "equinox": (
            "True (the default) computes the variance in one pass, shifted by a "
            "sample of the data so that it stays accurate on offset data; False "
            "computes the exact two-pass variance, at the cost of a second pass over "
            "the data (the collective stays one). {flax} computes two passes."
        ),
    },
    "force_float32_reductions": (
        "True (the default) keeps the running statistics in float32; False keeps "
        "them in `param_dtype`, as in {flax}. The statistics of each batch are "
        "computed in at least float32 either way: reducing in bfloat16 is not faster "
        "on any backend measured and loses most of the variance's digits."
    ),
    "virtual_batch_size": {
        "default": (
            'statistics over consecutive groups ("virtual" or "ghost" batches) of this '
            "many examples along axis 0, which it must divide; the running statistics "
            "move towards the mean over groups of the group means and variances. Groups "
            "are local to each device (no collective). None: the whole batch."
        ),
        "equinox": (
            "statistics over consecutive groups of this many examples along the "
            "input's first axis, for a layer called on a batch rather than one "
            "example. A layer called on one example, the Equinox way, has no examples "
            "to group: nest two vmaps, the inner one over the examples of a group, or "
            "use `axis_index_groups` under `pmap`. None: no groups."
        ),
    },
    "bessel_correction": (
        "update the running variance with the unbiased batch variance "
        "n / (n - 1) * var_B, n the number of valid values per feature (per group "
        "with virtual batches), as PyTorch does; the normalization itself always "
        "uses the biased var_B. False by default, Flax's convention."
    ),
    "batch_stats_dtype": (
        "the dtype of the running statistics `mean` and `var`. None (the default) "
        "keeps them in float32 (linen: in `param_dtype` with "
        "`force_float32_reductions=False`), whatever the input. `jnp.float64`, with "
        "`jax_enable_x64`, keeps them in float64: inference on float64 inputs is then "
        "as accurate as the float64 computation (on offset data float32 statistics "
        "cost about 1e-4 relative). The pure functions keep the dtype of the "
        "`batch_stats` they are given (`init_batch_stats(n, jnp.float64)`)."
    ),
    "r_max": {
        "pure": (
            "the bound on r, >= 1: r is clipped to [1 / r_max, r_max]. A Python "
            "float or a traced scalar, e.g. a schedule evaluated at the step inside "
            "`jit` (see `jaxrenorm.schedules`). `r_max=1` with `d_max=0` is "
            "BatchNorm."
        ),
        "module": (
            "the bound on r, >= 1 (r is clipped to [1 / r_max, r_max]): "
            + _MODULE_BOUND
            + " Default: the paper's schedule `jaxrenorm.schedules.PAPER_R_MAX`, 1 "
            "(plain BatchNorm) until step 5,000, then linear to 3 at step 40,000; "
            "for a shorter run use `jaxrenorm.schedules.scaled_paper_schedules`."
        ),
    },
    "d_max": {
        "pure": (
            "the bound on |d|, >= 0: d is clipped to [-d_max, d_max]. A Python "
            "float or a traced scalar."
        ),
        "module": (
            "the bound on |d|, >= 0 (d is clipped to [-d_max, d_max]): "
            + _MODULE_BOUND
            + " Default: the paper's schedule `jaxrenorm.schedules.PAPER_D_MAX`, 0 "
            "until step 5,000, then linear to 5 at step 25,000."
        ),
    },
    "grad_through_batch_moments": (
        "how the gradient flows through the batch's (or each virtual group's) mean "
        "and variance; the forward pass is the same. True: the paper's gradient. "
        "False: the group moments are constants in the backward pass, for groups "
        "known not to represent the data (e.g. each holds one class), after a "
        'BatchNorm warm-up. "adaptive": per feature, the gradient through the group '
        "moments weighted by exp(-max(F - 1, 0)), F = n s_b^2 / (s_w^2 + epsilon) "
        "the one-way ANOVA F statistic of the call's virtual groups (s_b^2 the "
        "unbiased variance of the group means, s_w^2 the mean unbiased variance "
        "within the groups of n values): the paper's gradient where the groups "
        "agree, almost none where they differ. It needs `virtual_batch_size` "
        "smaller than the batch; with one group it is the paper's gradient. The "
        "math: [Concepts, Batch Renormalization](../concepts.md#batch-renormalization)."
    ),
    "diagnostics": {
        "equinox": (
            "if True, each training call stores `r_clipped`, `d_clipped`, "
            "`r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) "
            "in the state, as a dict under `layer.diagnostics_index` (zeros until the "
            "first training call). Off by default."
        ),
        "linen": (
            "if True, each training call sows `r_clipped`, `d_clipped`, "
            "`r_mean_abs_dev` and `d_mean_abs` into the `intermediates` collection; "
            "`jaxrenorm.collect_diagnostics` gathers them. Off by default, and free "
            "when off."
        ),
        "nnx": (
            "if True, each training call stores `r_clipped`, `d_clipped`, "
            "`r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) "
            "as a dict in `self.diagnostics_values`, an `nnx.Intermediate` (zeros "
            "until the first training call). Off by default."
        ),
    },
    "rho_init": {
        "module": (
            "the initializer of the gate `rho` (feature shape, `param_dtype`): 0.5 "
            "everywhere by default, an even mix of batch and instance statistics."
        ),
        "equinox": (
            "the initial value of the gate `rho`, a per-channel parameter in the "
            "dtype of `weight`: 0.5 by default, an even mix of batch and instance "
            "statistics."
        ),
    },
    "debias_running_average": (
        "keep zero-debiased running averages: each training call updates with the "
        "momentum `debiased_momentum(momentum, steps)` (0 on the first call; see "
        "`jaxrenorm.debiased_momentum`) and increments an int32 `steps` counter kept "
        "with the running statistics, so "
        "that after t calls they are the average of the t batches' statistics "
        "weighted by (1 - m) m^(t - i), normalized to sum to one: they describe the "
        "batches however short the run, not their initial values. False (the "
        "default) is Flax's plain exponential average, from 0 and 1."
    ),
    # Equinox's names (jaxrenorm.equinox), after eqx.nn.BatchNorm's constructor.
    "input_size": "the number of channels, the size of the example's first axis.",
    "eps": "a small value added to the variance before the square root, >= 0; as in {flax}.",
    "channelwise_affine": ("learn a per-channel `weight` (gamma) and `bias` (beta); as in {flax}."),
    "inference": (
        "True normalizes with the running statistics (evaluation), False with the "
        "batch's, returning the state with the running ones updated (training). "
        "`eqx.nn.inference_mode` sets it, and the call's `inference` takes "
        "precedence. As in {flax}."
    ),
    "mode": (
        '"batch" (the default): zero-debiased running averages that start at 0, '
        "whose variance {flax} starts at 1 instead, overestimating it for hundreds "
        'of steps; "ema": running averages that start at the first batch\'s '
        "statistics. Either way a training call normalizes with the batch's "
        'statistics ({flax}\'s "ema" normalizes with the running averages).'
    ),
    "promote_dtype": (
        "called as `promote_dtype((x, mean, var, scale, bias), dtype=dtype)`, it "
        "returns them promoted to one dtype: the layer normalizes the promoted input "
        "with the promoted scale and bias and outputs their dtype; as in {flax}. The "
        "statistics are still computed, and the running statistics kept, in at "
        "least float32."
    ),
    "rngs": "the `nnx.Rngs` whose `params` stream the initializers draw from.",
    "bias_metadata": (
        "metadata of the `bias` `nnx.Param`, e.g. its sharding annotation, which "
        "`nnx.get_partition_spec` and sharding rules read; as in {flax}."
    ),
    "scale_metadata": "metadata of the `scale` `nnx.Param`, like `bias_metadata`; as in {flax}.",
    "rho_metadata": "metadata of the `rho` `nnx.Param`, like `bias_metadata`.",
}

# Parameters that are part of the machinery, not the layer's settings.
_NOT_DOCUMENTED = {"self", "parent", "name"}


def documents(family: str, **specific: str) -> Callable[[T], T]:
    """Marks an object whose argument section is written from `ARGUMENTS`.

    `family` is "pure" (a function: its signature), "linen" (a module: its
    dataclass fields), "nnx" or "equinox" (a module: the constructors of its
    classes). `specific` overrides a description for this object. The docstring
    is left as written: `write_sections` writes the section into the source.
    """

    def mark(obj: T) -> T:
        obj.__jaxrenorm_documents__ = (family, specific)  # type: ignore[attr-defined]
        return obj

    return mark


def documented_docstring(obj: Any) -> str:
    """`obj`'s docstring (as `inspect.cleandoc` shows it) with its argument sections as
    written from `ARGUMENTS`: replaced where it has them, else before `Returns:` or
    `Examples:`, or at the end."""
    family, specific = obj.__jaxrenorm_documents__
    sections = []
    for owner, names in _argument_groups(obj, family):
        title = "Args:" if owner is obj else f"Args: Inherited from {owner.__name__}:"
        entries = [_entry(name, specific.get(name) or _describe(name, family)) for name in names]
        sections += ["", title, *entries] if sections else [title, *entries]
    doc = _insert(_without_section(inspect.cleandoc(obj.__doc__ or "")), sections)
    return doc.rstrip("\n")


# The title of an argument section: `Args:`, or `Args: Inherited from BatchNorm:`
# (a Google-style section with a title, as griffe reads it).
_SECTION_TITLE = re.compile(r"^Args:( Inherited from \w+:)?$")


def _without_section(doc: str) -> str:
    """The docstring without its argument sections (each title, the indented lines
    under it, and the blank line that follows)."""
    lines, out, skipping = doc.split("\n"), [], False
    for line in lines:
        if _SECTION_TITLE.match(line):
            skipping = True
        elif skipping and not line.startswith(" "):
            skipping = False
            if not line:
                continue
        if not skipping:
            out.append(line)
    return "\n".join(out).rstrip("\n") + ("\n" if doc.endswith("\n") else "")


def _argument_groups(obj: Any, family: str) -> list[tuple[Any, list[str]]]:
    """(owner, names) in the order a reader looks for them: a layer's own arguments
    (those it adds over its base class) first, then those of each base class, the
    nearest first; each group in the order of the signature. A function is its own
    owner."""
    names = _argument_names(obj, family)
    if family == "pure":
        return [(obj, names)]
    bases = [c for c in obj.__mro__ if c.__module__ == obj.__module__]
    declared = {c: _declared(c, family) for c in bases}
    # The owner of an argument is the most basic class that declares it: a subclass
    # that repeats `num_features` (NNX) or `input_size` (Equinox) does not add it.
    owner = {name: next(c for c in reversed(bases) if name in declared[c]) for name in names}
    groups = [(c, [n for n in names if owner[n] is c]) for c in bases]
    return [(c, group) for c, group in groups if group]


def _declared(cls: type, family: str) -> set[str]:
    """The arguments `cls` itself declares: its annotated fields, or its constructor's."""
    if family == "linen":
        return set(inspect.get_annotations(cls))
    return set(_parameters(cls.__init__)) if "__init__" in vars(cls) else set()


def _argument_names(obj: Any, family: str) -> list[str]:
    if family == "linen":
        names = [f.name for f in dataclasses.fields(obj)]
    elif family in ("nnx", "equinox"):
        names = []  # the base class's constructor first, then each subclass's additions
        for cls in reversed(obj.__mro__):
            if "__init__" in vars(cls) and cls.__module__.startswith("jaxrenorm"):
                names += [n for n in _parameters(cls.__init__) if n not in names]
    else:
        names = _parameters(obj)
    return [n for n in names if n not in _NOT_DOCUMENTED]


def _parameters(fn: Callable) -> list[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind not in kinds]


def _describe(name: str, family: str) -> str:
    text = ARGUMENTS[name]  # a KeyError at import: an argument without a description
    if isinstance(text, dict):
        if family in text:
            key = family
        elif family != "pure" and "module" in text:
            key = "module"
        else:
            key = "default"
        text = text[key]
    return text.replace("{flax}", _FLAX[family])


def _entry(name: str, text: str) -> str:
    return textwrap.fill(
        f"{name}: {text}",
        width=80,
        initial_indent="  ",
        subsequent_indent="    ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def _insert(doc: str, section: list[str]) -> str:
    match = re.search(r"^(Returns|Examples):$", doc, flags=re.M)
    block = "\n".join(section)
    if match is None:
        return f"{doc}\n\n{block}\n"
    return f"{doc[: match.start()]}{block}\n\n{doc[match.start() :]}"


def documented_objects() -> list[Any]:
    """Every object of the package marked `@documents`."""
    import importlib.util

    import jaxrenorm
    import jaxrenorm.linen
    import jaxrenorm.nnx

    modules: list[Any] = [jaxrenorm, jaxrenorm.linen, jaxrenorm.nnx]
    if importlib.util.find_spec("equinox") is not None:  # an optional dependency
        import jaxrenorm.equinox

        modules.append(jaxrenorm.equinox)
    found = []
    for module in modules:
        for value in vars(module).values():
            if hasattr(value, "__jaxrenorm_documents__") and value not in found:
                if "__jaxrenorm_documents__" in vars(value) or inspect.isfunction(value):
                    found.append(value)
    return found


def write_sections() -> list[str]:
    """Rewrites, in the source files, every marked docstring that is out of date.

    Returns the names of the objects rewritten.
    """
    import ast
    import pathlib

    rewritten = []
    for obj in documented_objects():
        path = pathlib.Path(inspect.getsourcefile(obj) or inspect.getfile(obj))
        source = path.read_text()
        want = documented_docstring(obj)
        if want == inspect.cleandoc(obj.__doc__ or ""):
            continue
        node = next(
            n
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == obj.__name__
        )
        doc = node.body[0]
        lines = source.split("\n")
        indent = " " * doc.col_offset
        body = [f"{indent}{line}" if line else "" for line in want.split("\n")]
        body[0] = f'{indent}"""{want.split(chr(10))[0]}'
        lines[doc.lineno - 1 : doc.end_lineno] = [*body, f'{indent}"""']
        path.write_text("\n".join(lines))
        rewritten.append(obj.__qualname__)
    return rewritten
