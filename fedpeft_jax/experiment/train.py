"""A training run: build the experiment, restore it if the workdir holds one, run the
loop with the standard callbacks (`callbacks.standard`). Start reading here."""
from __future__ import annotations

import os

from fedpeft_jax import resume
from fedpeft_jax.federated import algorithms
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks as callbacks_lib
from fedpeft_jax.experiment import console
from fedpeft_jax.experiment import loop
from fedpeft_jax.experiment import multihost
from fedpeft_jax.experiment import workdir as workdir_lib


def train(config, workdir: str) -> list[dict]:
  """Runs, resumes or (if finished) leaves the run in `workdir`; returns every round's record.

  Writes `metrics.jsonl` (a line a round; a fresh run starts with round 0, the initial
  model evaluated before training), `tb/` (TensorBoard), `config.json`,
  `run.json`, `partition.json`, `checkpoints/` and, at the end, `trainable.npz` (and
  `merged.npz` for a LoRA rule that merges into the kernels). With several
  processes (`jax.distributed`) every one calls this; process 0 writes and
  returns the records, the others return [].
  """
  primary = multihost.is_primary()
  workdir = multihost.agree(lambda: workdir_lib.prepare(workdir))
  lock = multihost.agree(lambda: workdir_lib.Lock(workdir) if primary else None)
  try:
    return _train_locked(config, workdir, primary)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(config, workdir: str, primary: bool) -> list[dict]:
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  checkpointer = resume.RunCheckpointer(workdir, config.checkpoint.keep)
  latest = multihost.agree(lambda: checkpointer.latest(config, config.checkpoint.force))
  rounds = config.fl.rounds
  if latest is not None and latest[0] >= rounds:
    console.say(f'{workdir} holds a finished run ({latest[0]} rounds): nothing to do. '
                'Raise --config.fl.rounds to train longer, or use another --workdir.')
    return callbacks_lib.read_metrics(metrics_path) if primary else []
  if primary:
    workdir_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
    info = workdir_lib.run_info()
    info['resumed_from_round'] = latest[0] if latest else 0
    workdir_lib.write_json(os.path.join(workdir, 'run.json'), info)

  ledger = callbacks_lib.restore_ledger(config, latest[1] if latest else None,
                                       checkpointer.directory)
  experiment = build.build(config, ledger)
  if primary:
    workdir_lib.write_json(os.path.join(workdir, 'partition.json'), experiment.partition)
  callbacks = callbacks_lib.standard(experiment, config, workdir, checkpointer, primary, ledger)
  state = experiment.state
  if latest is not None:
    step, saved = latest
    state = checkpointer.restore_state(step, state)
    loop.restore(callbacks, saved, checkpointer.directory)
    console.say(f'resuming from round {step} of {workdir}')
  loop.run(experiment.compile_round(state), state, rounds, callbacks)
  return callbacks_lib.read_metrics(metrics_path) if primary else []
