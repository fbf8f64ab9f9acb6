"""A training run: build the experiment, restore it if the workdir holds one, run the
loop with the standard callbacks. Start reading here."""
from __future__ import annotations

import os

from fedpeft_jax import resume
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks as callbacks_lib
from fedpeft_jax.experiment import console
from fedpeft_jax.experiment import loop
from fedpeft_jax.experiment import workdir as workdir_lib


def train(config, workdir: str) -> list[dict]:
  """Runs, resumes or (if finished) leaves the run in `workdir`; returns every round's record.

  Writes `metrics.jsonl` (a line a round), `tb/` (TensorBoard), `config.json`,
  `run.json`, `checkpoints/` and, at the end, `trainable.npz`.
  """
  workdir = workdir_lib.prepare(workdir)
  lock = workdir_lib.Lock(workdir)
  try:
    return _train_locked(config, workdir)
  finally:
    lock.release()


def _train_locked(config, workdir: str) -> list[dict]:
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  checkpointer = resume.RunCheckpointer(workdir, config.checkpoint.keep)
  latest = checkpointer.latest(config, config.checkpoint.force)
  rounds = config.fl.rounds
  if latest is not None and latest[0] >= rounds:
    console.say(f'{workdir} holds a finished run ({latest[0]} rounds): nothing to do. '
                'Raise --config.fl.rounds to train longer, or use another --workdir.')
    return callbacks_lib.read_metrics(metrics_path)
  workdir_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  info = workdir_lib.run_info()
  info['resumed_from_round'] = latest[0] if latest else 0
  workdir_lib.write_json(os.path.join(workdir, 'run.json'), info)

  experiment = build.build(config)
  traffic = callbacks_lib.Traffic(experiment.num_trainable)
  clock = callbacks_lib.RoundClock()
  stateful = [traffic, clock]
  state = experiment.state
  if latest is not None:
    step, saved = latest
    state = checkpointer.restore_state(step, state)
    for callback in stateful:
      callback.load_state_dict(saved[callback.name])
    console.say(f'resuming from round {step} of {workdir}')

  fl = config.fl
  callbacks = [
      traffic,
      callbacks_lib.RoundSummary(experiment.num_trainable),
      callbacks_lib.StopIfAllNonFinite(checkpointer.directory),
      callbacks_lib.Evaluation(experiment.evaluate, fl.eval_every, rounds),
  ]
  if experiment.privacy is not None:
    callbacks.append(callbacks_lib.Privacy(experiment.privacy, fl.eval_every, rounds))
  callbacks += [
      clock,
      callbacks_lib.MetricsLog(metrics_path),
      callbacks_lib.TensorBoard(os.path.join(workdir, 'tb')),
      callbacks_lib.Console(rounds),
      callbacks_lib.Checkpoint(checkpointer, config, config.checkpoint.every, rounds,
                               stateful),
      callbacks_lib.ExportTrainable(os.path.join(workdir, 'trainable.npz')),
  ]
  loop.run(experiment.compile_round(state), state, rounds, callbacks)
  return callbacks_lib.read_metrics(metrics_path)
