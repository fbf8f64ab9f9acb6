"""Run checkpoints: exact resume after preemption, refusal of a mismatched workdir.

A checkpoint holds everything the next round depends on: the server state
(global trainable parameters, server optimizer and aggregator state, round,
the run's key) and, as JSON, the metrics so far, the communication and
privacy ledgers and the config that made it. The frozen backbone and the data
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

from fedpeft_jax import errors
from fedpeft_jax.federated import fedavg

# Keys that may change between a run and its resumption: they do not change
# what any round computes.
RESUMABLE_CHANGES = ('fl.rounds', 'fl.eval_every', 'checkpoint.', 'eval.batch_size',
                     'data.download', 'data.data_dir')


class ResumeError(errors.UserError):
  pass


def _flat_config(config) -> dict:
  return {'.'.join(k): v for k, v in traverse_util.flatten_dict(config.to_dict()).items()}


def config_differences(saved: dict, config) -> list[str]:
  current = _flat_config(config)
  keys = sorted(set(saved) | set(current))
  return [f'{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}' for k in keys
          if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)]


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
        meta=ocp.args.JsonSave({**meta, 'config': _flat_config(config)})))
    self._manager.wait_until_finished()

  def restore(self, template: fedavg.ServerState, config, force: bool):
    """Returns (state, meta) of the latest checkpoint, or None if there is none."""
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
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            template._replace(rng=jax.random.key_data(template.rng)))
    arrays = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    state = fedavg.ServerState(*arrays)
    return state._replace(rng=jax.random.wrap_key_data(state.rng)), meta


def export_trainable(path: str, trainable) -> None:
  """The trained parameters as an official-layout `.npz`: all a user ships."""
  flat = traverse_util.flatten_dict(trainable, sep='/')
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
