"""Run checkpoints: exact resume after preemption, refusal of a mismatched workdir.

A checkpoint holds everything the next round depends on: the server state
(global trainable parameters, server optimizer and aggregator state, round,
the run's key) and, as JSON, the running values of the run's callbacks
(traffic, wall time, ...) and the config that made it. The frozen backbone and the data
partition are rebuilt from the config (seeded), so they are not stored.
Orbax writes into a temporary directory and renames it when complete: a crash
mid-save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.data import partition
from fedpeft_jax.federated import types

# Keys that may change between a run and its resumption: they do not change
# what any round computes.
RESUMABLE_CHANGES = ('fl.rounds', 'fl.eval_every', 'checkpoint.', 'eval.batch_size',
                     'data.download', 'data.data_dir')

# Under DP (in the checkpoint or now) a resume never changes these, not even forced: every
# `dp.*` key (the mechanism, its accounting, DP on or off) and what decides who the clients
# are and which examples they hold, how each round samples them and how many noised steps a
# round takes. The privacy ledger composes the rounds of each population (client level: all
# clients; sample level: the clients of each size) and reports the least protected one, so
# rounds of another population would be composed as if of this one.
DP_LOCKED_KEYS = frozenset({
    'seed', 'fl.num_clients', 'fl.clients_per_round', 'fl.batch_size', 'fl.local_epochs',
    'data.source', 'data.name', 'data.path', 'data.train_split', 'data.num_train_examples',
    'data.num_classes', 'data.partition', 'data.client_feature', 'data.client_field',
    'data.min_client_examples',  # Text: who the clients are, and which are left out.
    *partition.option_defaults()})  # Every partition's own keys: data.alpha, ...

# A mismatched state names this many differing leaves, then counts the rest.
MAX_NAMED_LEAVES = 4


class ResumeError(errors.UserError):
  pass


def dp_locked(key: str) -> bool:
  """Whether a resume under DP must keep config key `key` (see DP_LOCKED_KEYS)."""
  return key.startswith('dp.') or key in DP_LOCKED_KEYS


def differing_keys(saved: dict, config) -> list[tuple[str, object, object]]:
  """(key, checkpoint value, current value) of every key that differs, bar those a run may
  change. A key newer than the checkpoint does not count at its default: a new key's
  default keeps the old behaviour."""
  current = configs.flat_config(config)
  defaults = configs.flat_config(configs.base_config())
  keys = sorted(set(saved) | set(current))
  return [(k, saved.get(k), current.get(k)) for k in keys
          if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)
          and not (k not in saved and k in defaults and current[k] == defaults[k])]


def config_differences(saved: dict, config) -> list[str]:
  """`differing_keys` as 'key: checkpoint A vs now B'."""
  return [_difference(*d) for d in differing_keys(saved, config)]


def _difference(key, saved, now) -> str:
  return f'{key}: checkpoint {saved!r} vs now {now!r}'


def dp_resume_refusal(saved: dict, config, step: int, directory: str) -> str | None:
  """Why resuming the checkpoint of round `step`, made with flat config `saved`, under
  `config` would break the privacy ledger's account (None: it would not). Force or not:

  - under DP (in the checkpoint or now), any change of a key `dp_locked` names;
  - under DP, from a checkpoint before its run's last round (`saved['fl.rounds']`), any
    change of what a round computes, and a recalibration of the noise (a changed
    `fl.rounds` under `dp.target_epsilon`): the rounds after the checkpoint may have been
    released (metrics line, TensorBoard, console) and run again on the same keys, hence the
    same noise draws, so two releases of different sums would share their noise and their
    difference would be released without any (a bit-identical rerun releases nothing new).
  """
  saved_mode = saved.get('dp.mode', 'none')
  if saved_mode == 'none' and config.dp.mode == 'none':
    return None
  differences = differing_keys(saved, config)
  where = f'the checkpoint in {directory} was made'
  locked = [_difference(*d) for d in differences if dp_locked(d[0])]
  if locked:
    mode = f' (dp.mode {saved_mode!r})' if saved_mode == config.dp.mode else ''
    return (f'{where} with other values of keys a DP run{mode} keeps to its end, force or '
            f'not (its privacy ledger holds their rounds): {"; ".join(locked)}. '
            'Use a new --workdir')
  run_rounds = saved.get('fl.rounds')
  if run_rounds is None or step >= run_rounds:
    return None  # At its run's end: no round after it was released.
  rounds = config.fl.rounds
  recalibrated = (config.dp.target_epsilon is not None and rounds != run_rounds
                  and rounds > step)
  if not differences and not recalibrated:
    return None
  change = ('; '.join(_difference(*d) for d in differences) if differences else
            f'fl.rounds: checkpoint {run_rounds} vs now {rounds} (under dp.target_epsilon '
            'its noise is calibrated again)')
  after = (f'round {run_rounds}' if step + 1 == run_rounds else
           f'rounds {step + 1}-{run_rounds}')
  return (f'{where} at round {step} of its {run_rounds}-round DP run: {after} may have '
          f'been released, and running them again with {change} '
          'would release other values on the same noise draws, which the privacy ledger '
          f'does not hold. Finish the run with the config that made it (fl.rounds '
          f'{run_rounds}) before changing it, or use a new --workdir')


def _leaf_shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{'trainable/head/kernel': (shape, dtype), ...} of a serialised state or its
  Orbax metadata: both name a leaf by the same path."""
  flat = ocp.tree.to_flat_dict(tree, sep='/')
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


def state_mismatches(saved: dict, wanted: dict) -> list[str]:
  """Every leaf path whose shape or dtype differs, or that only one side has, between two
  `_leaf_shapes` dicts; in path order."""
  def show(shape_dtype):
    shape, dtype = shape_dtype
    return f'{shape} {dtype}'
  problems = []
  for path in sorted(set(saved) | set(wanted)):
    if path not in wanted:
      problems.append(f'{path}: in the checkpoint ({show(saved[path])}), not now')
    elif path not in saved:
      problems.append(f'{path}: now ({show(wanted[path])}), not in the checkpoint')
    elif saved[path] != wanted[path]:
      problems.append(f'{path}: checkpoint {show(saved[path])} vs now {show(wanted[path])}')
  return problems


class LegacyServerState(NamedTuple):
  """`types.ServerState` as checkpoints before issue 20 name it: SCAFFOLD's variates
  where the generic `algorithm_state` is now. Restored positionally into the new one."""
  trainable: Any
  opt_state: Any
  aggregator_state: Any
  round: Any
  rng: Any
  variates: Any = ()


class RunCheckpointer:
  """Saves and restores a run's state in `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    # Handlers named up front, so the state's metadata is readable before it is restored.
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, state: types.ServerState, meta: dict, config) -> None:
    # Typed keys are stored as their raw uint32 data.
    arrays = state._replace(rng=jax.random.key_data(state.rng))
    self._manager.save(int(state.round), args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays),
        meta=ocp.args.JsonSave({**meta, 'config': configs.flat_config(config)})))
    self._manager.wait_until_finished()

  def latest(self, config, force: bool) -> tuple[int, dict] | None:
    """(round, saved values) of the latest checkpoint, None if there is none.

    Reads only the small JSON part, so a mismatched or finished workdir is
    known before any data is loaded. Raises ResumeError if the checkpoint was
    made with another config (unless `force`), or if resuming it would break a
    DP run's privacy ledger (force or not, see `dp_resume_refusal`).
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    refusal = dp_resume_refusal(meta['config'], config, step, self.directory)
    if refusal:
      raise ResumeError(refusal)
    differences = config_differences(meta['config'], config)
    if differences and not force:
      raise ResumeError(
          f'the checkpoint in {self._manager.directory} was made with another config: '
          + '; '.join(differences) + '. Use a new --workdir, or resume anyway with '
          '--config.checkpoint.force=True')
    return step, meta

  def restore_state(self, step: int, template: types.ServerState) -> types.ServerState:
    """The server state saved at round `step`, shaped like `template`.

    Raises ResumeError naming the first differing leaves (path, checkpoint shape and
    dtype vs now) if the saved tree is not `template`'s (a forced resume with another
    head, PEFT method, algorithm or server optimizer): read from Orbax's metadata, before
    any array.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            template._replace(rng=jax.random.key_data(template.rng)))
    metadata = self._manager.item_metadata(step)['state']
    if 'variates' in metadata.tree:  # Written before the algorithm state was generic.
      abstract = LegacyServerState(*abstract)
    problems = state_mismatches(_leaf_shapes(metadata.tree),
                                _leaf_shapes(ocp.tree.serialize_tree(abstract)))
    if problems:
      more = len(problems) - MAX_NAMED_LEAVES
      raise ResumeError(
          f'the checkpoint of round {step} in {self._manager.directory} holds another state '
          'than this config builds: ' + '; '.join(problems[:MAX_NAMED_LEAVES])
          + (f'; and {more} more' if more > 0 else '') + '. A forced resume cannot change '
          'the trained tree: resume with the config that made it, or use a new --workdir')
    arrays = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    state = types.ServerState(*arrays)
    return state._replace(rng=jax.random.wrap_key_data(state.rng))

  @property
  def directory(self) -> str:
    return str(self._manager.directory)


def latest_round(workdir: str) -> int | None:
  """The round of the newest complete checkpoint in `workdir`, read from the directory
  names alone (Orbax renames a checkpoint into place once it is complete)."""
  path = os.path.join(workdir, 'checkpoints')
  rounds = [int(name) for name in os.listdir(path) if name.isdigit()] if os.path.isdir(
      path) else []
  return max(rounds, default=None)


def export_trainable(path: str, trainable) -> None:
  """The trained parameters as an official-layout `.npz`: all a user ships."""
  flat = traverse_util.flatten_dict(trainable, sep='/')
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def read_npz(path: str) -> dict[str, np.ndarray]:
  """{key: array} of a flat `.npz` a run wrote (trainable.npz, merged.npz); UserError
  (argument 'path') for an unreadable file."""
  try:
    with np.load(path) as data:
      return {key: data[key] for key in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f'{path} is not a readable .npz ({type(e).__name__}): train '
                           'again to write it', argument='path') from None


def load_trainable(path: str, template):
  """The trainable tree `export_trainable` wrote to `path`, checked against `template`
  (the tree the config trains: same leaf paths and shapes), each leaf in the template's
  dtype. Raises `errors.UserError` (argument 'path') for a missing or unreadable file, or
  one of another config's trainable parameters (naming the first differences)."""
  if not os.path.isfile(path):
    raise errors.UserError(f'{path} does not exist: train first (a run writes it at its '
                           'end)', argument='path')
  saved = read_npz(path)
  wanted = traverse_util.flatten_dict(template, sep='/')
  problems = [f'{k} {saved[k].shape} in the file, not trained now' if k not in wanted else
              f'{k} {tuple(wanted[k].shape)} trained now, not in the file' if k not in saved
              else f'{k} {saved[k].shape} in the file, {tuple(wanted[k].shape)} now'
              for k in sorted(set(saved) | set(wanted))
              if k not in saved or k not in wanted or saved[k].shape != wanted[k].shape]
  if problems:
    more = f' (and {len(problems) - 2} more)' if len(problems) > 2 else ''
    raise errors.UserError(f'{path} holds other trainable parameters than this config '
                           f'trains: {"; ".join(problems[:2])}{more}: use the config '
                           '(peft.method and its options) that trained it', argument='path')
  return traverse_util.unflatten_dict(
      {k: np.asarray(saved[k], wanted[k].dtype) for k in wanted}, sep='/')
