"""The parameter tree cut by a label tree, and put back together; counts and paths."""
from __future__ import annotations

from flax import traverse_util

from fedpeft_jax.peft.base import FROZEN, TRAINABLE


def split(params, label_tree):
  """Cuts `params` into (trainable, frozen) nested dicts by `label_tree`."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(label_tree)
  pick = lambda want: traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == want})
  return pick(TRAINABLE), pick(FROZEN)


def merge(trainable, frozen):
  """Inverse of `split`: the full parameter tree for the model's `apply`."""
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def paths(tree) -> list[str]:
  """Every leaf's path, '/'-joined, sorted."""
  return sorted('/'.join(k) for k in traverse_util.flatten_dict(tree))


def count(tree) -> int:
  """How many numbers the tree's leaves hold."""
  return sum(int(v.size) for v in traverse_util.flatten_dict(tree).values())
