"""A training run: build the experiment, restore it if the workdir holds one, run the
loop with the standard callbacks. Start reading here."""
from __future__ import annotations

import os

from fedpeft_jax import resume
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks as callbacks_lib
from fedpeft_jax.experiment import console
from fedpeft_jax.experiment import loop
from fedpeft_jax.experiment import multihost
from fedpeft_jax.experiment import workdir as workdir_lib


def train(config, workdir: str) -> list[dict]:
  """Runs, resumes or (if finished) leaves the run in `workdir`; returns every round's record.

  Writes `metrics.jsonl` (a line a round), `tb/` (TensorBoard), `config.json`,
  `run.json`, `partition.json`, `checkpoints/` and, at the end, `trainable.npz`. With several
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

  privacy_state = None
  if latest is not None and config.dp.mode != 'none':
    privacy_state = latest[1].get(callbacks_lib.Privacy.name)
    if privacy_state is None:
      raise resume.ResumeError(
          f'the checkpoint in {checkpointer.directory} has no privacy ledger (made by an '
          'older version): its epsilon cannot be continued; use a new --workdir')
  experiment = build.build(config, privacy_state)
  if primary:
    workdir_lib.write_json(os.path.join(workdir, 'partition.json'), experiment.partition)
  traffic = callbacks_lib.Traffic(experiment.num_trainable,
                                  trees_per_transfer=2 if config.fl.algorithm == 'scaffold' else 1)
  clock = callbacks_lib.RoundClock()
  stateful = [traffic, clock]
  if experiment.privacy is not None:
    privacy = callbacks_lib.Privacy(experiment.privacy, config.fl.eval_every, rounds)
    stateful.append(privacy)
  state = experiment.state
  if latest is not None:
    step, saved = latest
    state = checkpointer.restore_state(step, state)
    for callback in stateful:
      callback.load_state_dict(saved[callback.name])
    console.say(f'resuming from round {step} of {workdir}')

  fl = config.fl
  callbacks = [traffic, callbacks_lib.RoundSummary(experiment.num_trainable)]
  if config.dp.mode != 'client':  # Under client DP the noised update is released anyway.
    callbacks.append(callbacks_lib.StopIfAllNonFinite(checkpointer.directory))
  callbacks.append(callbacks_lib.Evaluation(experiment.evaluate, fl.eval_every, rounds))
  if experiment.privacy is not None:
    callbacks += [privacy, callbacks_lib.SeparateDiagnostics()]
  callbacks.append(clock)
  if primary:  # Files written once, by process 0; every process saves its shards.
    callbacks += [callbacks_lib.MetricsLog(metrics_path),
                  callbacks_lib.TensorBoard(os.path.join(workdir, 'tb')),
                  callbacks_lib.Console(rounds)]
  callbacks.append(callbacks_lib.Checkpoint(checkpointer, config, config.checkpoint.every,
                                            rounds, stateful))
  if primary:
    callbacks.append(callbacks_lib.ExportTrainable(os.path.join(workdir, 'trainable.npz')))
  loop.run(experiment.compile_round(state), state, rounds, callbacks)
  return callbacks_lib.read_metrics(metrics_path) if primary else []
