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

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.federated import fedavg

# Keys that may change between a run and its resumption: they do not change
# what any round computes.
RESUMABLE_CHANGES = ('fl.rounds', 'fl.eval_every', 'checkpoint.', 'eval.batch_size',
                     'data.download', 'data.data_dir')


class ResumeError(errors.UserError):
  pass


def config_differences(saved: dict, config) -> list[str]:
  """The keys whose values differ, bar those a run may change. A key newer than the
  checkpoint does not count at its default: a new key's default keeps the old behaviour."""
  current = configs.flat_config(config)
  defaults = configs.flat_config(configs.base_config())
  keys = sorted(set(saved) | set(current))
  return [f'{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}' for k in keys
          if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)
          and not (k not in saved and k in defaults and current[k] == defaults[k])]


class RunCheckpointer:
  """Saves and restores a run's state in `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, state: fedavg.ServerState, meta: dict, config) -> None:
    # Typed keys are stored as their raw uint32 data.
    arrays = state._replace(rng=jax.random.key_data(state.rng))
    self._manager.save(int(state.round), args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays),
        meta=ocp.args.JsonSave({**meta, 'config': configs.flat_config(config)})))
    self._manager.wait_until_finished()

  def latest(self, config, force: bool) -> tuple[int, dict] | None:
    """(round, saved values) of the latest checkpoint, None if there is none.

    Reads only the small JSON part, so a mismatched or finished workdir is
    known before any data is loaded.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    differences = config_differences(meta['config'], config)
    if differences and not force:
      raise ResumeError(
          f'the checkpoint in {self._manager.directory} was made with another config: '
          + '; '.join(differences) + '. Use a new --workdir, or resume anyway with '
          '--config.checkpoint.force=True')
    return step, meta

  def restore_state(self, step: int, template: fedavg.ServerState) -> fedavg.ServerState:
    """The server state saved at round `step`, shaped like `template`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            template._replace(rng=jax.random.key_data(template.rng)))
    arrays = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    state = fedavg.ServerState(*arrays)
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
