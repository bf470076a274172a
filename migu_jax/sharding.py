"""Where each parameter lives on a mesh: logical axes by rule, mesh axes by strategy.

A model family describes its parameters once, as a table of rules (MaxText /
Bonsai style): a regular expression searched in the parameter's path
(``"layers_3/attention/q_proj/kernel"``) and the *logical* name of each of its
axes (``("embed", "heads")``). A strategy maps logical names to the axes of a
mesh:

* ``"fsdp"``: ``embed`` over the data axis, so every large parameter, its
  gradient and its optimizer state are split over the data-parallel devices
  (fully sharded data parallelism); ``vocab``, ``mlp``, ``heads`` and ``kv``
  over the model axis when the mesh has one (tensor parallelism).
* ``"tensor"``: only the model-axis part of ``"fsdp"`` (parameters replicated
  over the data axis).

Changing the parallelism is a change of strategy or mesh, never of a model.

The same rules place every tree that mirrors the parameters:

* optimizer state: its paths end with the parameter's (``0/mu/model/...``), so
  a rule searched in the path finds them;
* gradients: the parameters' paths;
* MIGU's statistics (:func:`migu_jax.apply_with_magnitudes`), shaped like the
  kernel's trailing (output) axes: a leaf with fewer axes than its rule takes
  the rule's trailing axes, so statistics and masks follow the kernels'
  output-axis sharding (a size-1 axis is never split).

An axis whose size does not divide by its mesh axis, a leaf no rule matches
(small heads, LoRA factors, scalars, PRNG keys) and a mesh axis already used by
another axis of the leaf stay replicated. The sharding only decides where the
computation runs: under ``jax.jit`` the quantile of a sharded statistic is
still over the whole output axis, so a sharded MIGU step applies the same mask
as one device.

Evaluation keeps the parameters where training placed them and splits each batch over the data axis
(:func:`shard_rows`); the train step places its own batches.

Example:
  >>> import numpy as np, jax
  >>> rules = ((r"q_proj/kernel$", ("embed", "heads")), (r"norm/scale$", ("norm",)))
  >>> sizes = {"data": 4, "model": 2}
  >>> mapping = logical_to_mesh("fsdp")
  >>> partition_spec(("layers_0", "attention", "q_proj", "kernel"), (32, 64), rules, sizes, mapping)
  P('data', 'model')
  >>> partition_spec(("layers_0", "attention", "q_proj", "kernel"), (64,), rules, sizes, mapping)
  P('model',)
  >>> partition_spec(("layers_0", "input_norm", "scale"), (32,), rules, sizes, mapping)
  P()
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from migu_jax import masking

Rules = Sequence[tuple[str, tuple[str | None, ...]]]
"""``(regular expression searched in the "/"-joined path, logical axis name per parameter axis)``, first
match wins."""

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv", "norm")
"""The logical axis names a family's rules use: vocabulary rows, the model width, the feed-forward width,
the query/output projections' heads x head_dim, the key/value projections' heads x head_dim, and a
normalization's width (never split)."""

STRATEGIES = ("replicated", "tensor", "fsdp")


def logical_to_mesh(strategy: str, *, data_axis: str = "data", model_axis: str = "model") -> dict[str, str]:
  """The mesh axis of each logical axis under ``strategy`` (a logical axis not named here is replicated).

  Example:
    >>> logical_to_mesh("fsdp")["embed"], logical_to_mesh("tensor").get("embed")
    ('data', None)
  """
  tensor = {"vocab": model_axis, "mlp": model_axis, "heads": model_axis, "kv": model_axis}
  if strategy == "replicated":
    return {}
  if strategy == "tensor":
    return tensor
  if strategy == "fsdp":
    return {**tensor, "embed": data_axis}
  raise ValueError(f"sharding strategy {strategy!r}; expected one of {STRATEGIES}.")


def path_names(path) -> tuple[str, ...]:
  """The names of a ``jax.tree_util`` key path (dict keys, attribute names, sequence indices)."""
  return masking._path_names(path)


def leaf_axes(names: tuple[str, ...], ndim: int, rules: Rules) -> tuple[str | None, ...] | None:
  """The logical axes of a leaf at ``names`` with ``ndim`` axes: its rule's, the rule's trailing ``ndim``
  for a statistic with fewer axes than its kernel, or None (no rule, or more axes than the rule)."""
  joined = "/".join(names)
  for pattern, axes in rules:
    if re.search(pattern, joined):
      return tuple(axes[len(axes) - ndim:]) if ndim <= len(axes) else None
  return None


def partition_spec(names: tuple[str, ...], shape: tuple[int, ...], rules: Rules,
                   axis_sizes: Mapping[str, int], mapping: Mapping[str, str]) -> P:
  """The PartitionSpec of one leaf (see the module docstring for the fallbacks), trailing Nones dropped.

  Args:
    names: the leaf's path names.
    shape: its shape.
    rules: the family's rules.
    axis_sizes: the mesh's ``{axis name: size}``.
    mapping: logical axis -> mesh axis, from :func:`logical_to_mesh`.
  """
  axes = leaf_axes(names, len(shape), rules)
  if axes is None:
    return P()
  spec, used = [], set()
  for size, logical in zip(shape, axes):
    mesh_axis = mapping.get(logical) if logical else None
    n = axis_sizes.get(mesh_axis, 1) if mesh_axis else 1
    if mesh_axis is None or n <= 1 or size % n or mesh_axis in used:
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  while spec and spec[-1] is None:  # the canonical form, as jit gives its outputs
    spec.pop()
  return P(*spec)


def partition_specs(tree, rules: Rules, mesh: Mesh, mapping: Mapping[str, str]):
  """A PartitionSpec per leaf of ``tree`` (parameters, gradients, optimizer state or statistics)."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: partition_spec(path_names(path), tuple(np.shape(x)), rules, sizes, mapping), tree)


def specs_by_rules(rules: Rules, mesh: Mesh, strategy: str = "fsdp", *, data_axis: str = "data",
                   model_axis: str = "model") -> Callable[[Any], Any]:
  """``tree -> PartitionSpec per leaf`` for ``mesh`` under ``strategy``: the ``state_specs`` of
  :func:`migu_jax.make_train_step` and the placement of its state.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> specs = specs_by_rules(((r"kernel$", ("embed", "mlp")),), mesh)
    >>> specs({"dense": {"kernel": np.zeros((jax.device_count(), 3)), "bias": np.zeros(3)}})["dense"]["bias"]
    P()
  """
  mapping = logical_to_mesh(strategy, data_axis=data_axis, model_axis=model_axis)
  return lambda tree: partition_specs(tree, rules, mesh, mapping)


def _spec_leaves(tree, specs) -> list:
  treedef = jax.tree.structure(tree)
  return treedef.flatten_up_to(specs)


def place(tree, mesh: Mesh, specs):
  """``tree`` on ``mesh``, each leaf by its spec (a PartitionSpec per leaf, as :func:`partition_specs`)."""
  leaves, treedef = jax.tree.flatten(tree)
  placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, _spec_leaves(tree, specs))]
  return treedef.unflatten(placed)


def constrain(tree, mesh: Mesh, specs):
  """``jax.lax.with_sharding_constraint`` of every leaf of ``tree`` to its spec (inside ``jax.jit``)."""
  leaves, treedef = jax.tree.flatten(tree)
  constrained = [jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))
                 for x, s in zip(leaves, _spec_leaves(tree, specs))]
  return treedef.unflatten(constrained)


def shard_rows(tree, mesh: Mesh, data_axis: str = "data"):
  """A host batch (the whole batch, the same on every process) on ``mesh``: each leaf whose leading axis
  divides by the ``data_axis`` size split over it (``P(data_axis)``), the others replicated. Every process
  fills only its own devices' shards (``jax.make_array_from_callback``), so it works across hosts.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> shard_rows({"ids": np.zeros((jax.device_count(), 3))}, mesh)["ids"].sharding.spec
    P('data',)
  """
  n = dict(zip(mesh.axis_names, mesh.devices.shape))[data_axis]

  def put(x):
    x = np.asarray(x)
    split = x.ndim > 0 and x.shape[0] % n == 0
    where = NamedSharding(mesh, P(data_axis) if split else P())
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

  return jax.tree.map(put, tree)


def unmatched(tree, rules: Rules, *, suffixes: tuple[str, ...] = ("kernel", "embedding")) -> list[str]:
  """Paths of leaves ending in one of ``suffixes`` that no rule places: what a family's table misses
  (its tests check it is empty)."""
  missing = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = path_names(path)
    if names and names[-1] in suffixes and leaf_axes(names, np.ndim(x), rules) is None:
      missing.append("/".join(names))
  return missing


__all__ = ["LOGICAL_AXES", "STRATEGIES", "Rules", "constrain", "leaf_axes", "logical_to_mesh", "partition_spec",
           "partition_specs", "path_names", "place", "shard_rows", "specs_by_rules", "unmatched"]
