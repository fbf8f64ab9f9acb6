"""What a run does around its rounds, one callback each (see `loop.Callback`), and the
standard list of a training run (`standard`).

A fresh run's round 0 (`loop.round_zero`: the initial model, before any training) goes
through the same callbacks' `on_round_zero`: its record holds `bytes_cumulative` 0,
`trainable_params`, `trainable_sha256`, the task's test metrics, `epsilon` 0 under DP and
`wall_s`; no client took part, so there is no loss, cohort or diagnostic.

By phase, in the order `standard` lists them: compute: `Traffic`, `RoundSummary`,
`StopIfAllNonFinite`, `Evaluation`, `Privacy`, `RoundClock` add to each round's record;
filter: `SeparateDiagnostics` (DP) moves what epsilon does not cover aside; write:
`MetricsLog`, `TensorBoard` and `Console` write the record; persist: `Checkpoint` saves the
server state with every stateful callback's running values, `ExportTrainable` the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from fedpeft_jax import resume
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import console
from fedpeft_jax.experiment import extra_callbacks
from fedpeft_jax.experiment import loop
from fedpeft_jax.federated.algorithms import ALGORITHMS
from fedpeft_jax.privacy import accounting
from fedpeft_jax.privacy.ledger import PrivacyLedger

BYTES_PER_PARAM = 4  # Trainable parameters travel as float32.
MIB = 2**20


class TrainingError(RuntimeError):
  """The run cannot go on; the last good checkpoint is intact."""


def tree_sha256(tree) -> str:
  """A digest of a parameter tree's paths and bytes: equal digests, equal parameters."""
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(tree, sep='/').items()):
    digest.update(path.encode())
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


class Traffic(loop.Stateful):
  """Bytes on the wire: the model goes down to every sampled client, updates come up
  from those that report.

  `trees_per_transfer`: trainable-sized trees in each direction; SCAFFOLD sends 2
  (the model and the server's control variate down, the update and the change of
  the client's variate up). `client_bytes(ids, round, state) -> (down, up)`: each client's
  own bytes instead, where they differ by client (a LoRA rule: each client's rank, and what
  the rule sends, `build.Experiment.client_bytes`; `state` after the round, where HetLoRA's
  self-pruning keeps the ranks).
  """
  name = 'traffic'

  def __init__(self, num_trainable: int, trees_per_transfer: int = 1,
               client_bytes: Callable | None = None):
    self.bytes_per_transfer = BYTES_PER_PARAM * num_trainable * trees_per_transfer
    self.client_bytes = client_bytes
    self.bytes_cumulative = 0

  def on_round_end(self, round_index, state, metrics, record):
    down = self.bytes_per_transfer * int(metrics.num_sampled)
    # Every client that did not drop out sends its update, finite or not.
    up = self.bytes_per_transfer * int(np.sum(metrics.reported))
    if self.client_bytes is not None:
      clients, reported = np.asarray(metrics.clients), np.asarray(metrics.reported)
      down = int(self.client_bytes(clients[clients >= 0], round_index, state)[0].sum())
      up = int(self.client_bytes(clients[reported & (clients >= 0)], round_index,
                                 state)[1].sum())
    self.bytes_cumulative += up + down
    return {'bytes_up': up, 'bytes_down': down, 'bytes_cumulative': self.bytes_cumulative}

  def on_round_zero(self, state, record):
    return {'bytes_cumulative': self.bytes_cumulative}  # 0: nothing sent yet.

  def state_dict(self):
    return {'bytes_cumulative': self.bytes_cumulative}

  def load_state_dict(self, saved):
    self.bytes_cumulative = saved['bytes_cumulative']


class RoundSummary(loop.Callback):
  """Who took part, the local training loss and a digest of the new global parameters."""

  def __init__(self, num_trainable: int):
    self.num_trainable = num_trainable

  def on_round_end(self, round_index, state, metrics, record):
    return {
        # None (JSON null) in a round that aggregated no example: there was no training.
        'train_loss': float(metrics.train_loss) if np.isfinite(metrics.train_loss) else None,
        'clients': [int(c) for c in metrics.clients if c >= 0],
        'clients_reported': int(metrics.num_reported),
        'clients_nonfinite': int(metrics.num_nonfinite),
        'trainable_params': self.num_trainable,
        'trainable_sha256': tree_sha256(state.trainable),
        # The algorithm's own scalars (a LoRA rule's lora_aggregation_error); NaN: null.
        **{key: float(value) if np.isfinite(value) else None
           for key, value in getattr(metrics, 'algorithm', {}).items()}}

  def on_round_zero(self, state, record):
    return {'trainable_params': self.num_trainable,
            'trainable_sha256': tree_sha256(state.trainable)}


class StopIfAllNonFinite(loop.Callback):
  """Every reporting client sent NaN or Inf: lowering the learning rate is the fix. It
  raises `TrainingError` (not a `loop.Stop`): the run ends at once, so the round is neither
  written nor checkpointed, and the last good checkpoint stays the latest."""

  def __init__(self, checkpoint_dir: str):
    self.checkpoint_dir = checkpoint_dir

  def on_round_end(self, round_index, state, metrics, record):
    if int(metrics.num_reported) == 0 and int(metrics.num_nonfinite):
      raise TrainingError(
          f'round {round_index}: every reporting client ({int(metrics.num_nonfinite)}) '
          f'sent a NaN or Inf update; the last good checkpoint in {self.checkpoint_dir} '
          'is intact. Lower --config.optim.lr or check the data')


def is_due(round_index: int, every: int, rounds: int) -> bool:
  """Periodic work (evaluation, checkpoints) runs every `every` rounds and at the end."""
  return round_index % every == 0 or round_index == rounds


class Evaluation(loop.Callback):
  """The task's test metrics (e.g. `test_accuracy`) every `every` rounds and after the last,
  and of the initial model in a fresh run's round 0."""

  def __init__(self, evaluate: Callable[..., dict], every: int, rounds: int,
               served: Callable | None = None):
    self.evaluate, self.every, self.rounds = evaluate, every, rounds
    self.served = served  # state -> (trainable, frozen): build.Experiment.served.

  def _metrics(self, state) -> dict:
    if self.served is None:
      return dict(self.evaluate(state.trainable))
    return dict(self.evaluate(*self.served(state)))

  def on_round_zero(self, state, record):
    return self._metrics(state)

  def on_round_end(self, round_index, state, metrics, record):
    if is_due(round_index, self.every, self.rounds):
      return self._metrics(state)
    return None


def _no_ledger(source: str) -> resume.ResumeError:
  return resume.ResumeError(
      f'the checkpoint in {source} has no privacy ledger (made by an older version): its '
      'epsilon cannot be continued; use a new --workdir')


class Privacy(loop.Stateful):
  """Records each round's executed mechanism (`spec`) into the run's `PrivacyLedger`, and
  composes it into the epsilon spent so far (on evaluated rounds: accounting is not free).

  The ledger travels in the checkpoint (its `state_dict`), so after any resume (a grown
  `fl.rounds` included) the epsilon printed composes what really ran, never the config.
  `ledger`: the one `build` set the noise from (`restore_ledger`); default a new one.
  A checkpoint without a ledger cannot be continued: `missing_state` raises ResumeError.
  """
  name = 'privacy'

  def __init__(self, spec: accounting.PrivacySpec, every: int, rounds: int,
               ledger: PrivacyLedger | None = None):
    self.spec, self.every, self.rounds = spec, every, rounds
    self.ledger = PrivacyLedger() if ledger is None else ledger

  def on_round_end(self, round_index, state, metrics, record):
    self.ledger.record(self.spec)
    if not is_due(round_index, self.every, self.rounds):
      return None
    epsilon = self.ledger.epsilon(self.spec.delta, self.spec.accountant)
    values = {'epsilon': accounting.json_safe_epsilon(epsilon),
              'noise_multiplier': self.spec.noise_multiplier}
    if 'clip_norm' in metrics.aggregator:  # Adaptive clipping's norm is itself a noised release.
      values['clip_norm'] = float(metrics.aggregator['clip_norm'])
    if 'clipped_fraction' in metrics.aggregator:
      values['clipped_fraction'] = float(metrics.aggregator['clipped_fraction'])
    return values

  def on_round_zero(self, state, record):
    # The initial model is public (pretrained, or from the public seed): nothing released.
    return {'epsilon': 0.0}

  def state_dict(self):
    return self.ledger.state_dict()

  def load_state_dict(self, saved):
    self.ledger.load_state_dict(saved)

  def missing_state(self, source):
    raise _no_ledger(source)


def restore_ledger(config, saved: Mapping[str, Any] | None,
                   source: str) -> PrivacyLedger | None:
  """The run's privacy ledger, before the experiment is built (the noise of the rounds left
  depends on it): None without DP, a new one without a checkpoint, else the one in the
  checkpoint's callback values `saved` (made in `source`); ResumeError if they hold none."""
  if config.dp.mode == 'none':
    return None
  if saved is None:
    return PrivacyLedger()
  if Privacy.name not in saved:
    raise _no_ledger(source)
  return PrivacyLedger.from_state_dict(saved[Privacy.name])


# Computed from the clients' data without noise: outside what epsilon covers.
DIAGNOSTICS = ('train_loss', 'clients_reported', 'clients_nonfinite', 'clipped_fraction')
# The same, from a federated algorithm's own scalars (a LoRA rule's, from the clients'
# products): moved there too, after the above, when a round has them.
ALGORITHM_DIAGNOSTICS = ('lora_aggregation_error',)


class SeparateDiagnostics(loop.Callback):
  """Under DP, moves what the guarantee does not cover into `record['diagnostics']` and
  drops the sampled client ids (under Poisson sampling they reveal membership).

  The other keys keep their order; 'diagnostics' goes before the clock's keys
  (`RoundClock.KEYS`), where metrics.jsonl lines have always had it.
  """
  phase = 'filter'

  def on_round_end(self, round_index, state, metrics, record):
    moved = DIAGNOSTICS + ALGORITHM_DIAGNOSTICS
    kept = {k: v for k, v in record.items() if k != 'clients' and k not in moved}
    timing = {k: kept.pop(k) for k in RoundClock.KEYS if k in kept}
    return {**kept, 'diagnostics': {k: record[k] for k in moved if k in record}, **timing}


class RoundClock(loop.Stateful):
  """`round_s`: this round's seconds; `wall_s`: the run's, across restarts.

  The round is compiled before the loop starts, so no round's time includes it. Last of
  the compute phase in `standard`, so a round's time includes evaluation and accounting.
  Round 0 has `wall_s` only: the seconds its evaluation took, which round 1's `round_s`
  leaves out.
  """
  name = 'clock'
  KEYS = ('round_s', 'wall_s')

  def __init__(self):
    self.offset = 0.0

  def on_run_start(self, state):
    self.start = self.last = time.perf_counter()

  def on_round_end(self, round_index, state, metrics, record):
    now = time.perf_counter()
    values = {'round_s': now - self.last, 'wall_s': self.offset + now - self.start}
    self.last = now
    return values

  def on_round_zero(self, state, record):
    self.last = time.perf_counter()
    return {'wall_s': self.offset + self.last - self.start}

  def state_dict(self):
    return {'wall_s': self.offset + self.last - self.start}

  def load_state_dict(self, saved):
    self.offset = saved['wall_s']


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsLog(loop.Callback):
  """One JSON line a round in `path`, round 0 first; rounds after the checkpoint a run
  resumes from are dropped first, since they run again (a fresh run drops every line: its
  round 0 is made again)."""
  phase = 'write'

  def __init__(self, path: str):
    self.path = path

  def on_run_start(self, state):
    done = int(state.round)
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:  # A kill mid-write can leave a partial last line.
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break
          if done == 0 or record['round'] > done:
            break
          kept.append(line)
    with open(self.path, 'w') as f:
      f.writelines(kept)
    self.file = open(self.path, 'a')

  def on_round_end(self, round_index, state, metrics, record):
    self.file.write(json.dumps(dict(record)) + '\n')
    self.file.flush()

  def on_round_zero(self, state, record):
    self.on_round_end(0, state, None, record)

  def on_run_end(self, state):
    self.file.close()


# Record keys -> TensorBoard tags, and the factor each value is scaled by.
TENSORBOARD_TAGS = {
    'test_accuracy': ('accuracy/test', 1),
    'test_perplexity': ('perplexity/test', 1),  # Text (causal_lm).
    'test_loss': ('loss/test', 1),  # Text (causal_lm).
    'train_loss': ('loss/train', 1),
    'bytes_cumulative': ('traffic/sent_MiB', 1 / MIB),
    'clients_reported': ('clients/reported', 1),
    'epsilon': ('privacy/epsilon', 1),
    'clipped_fraction': ('privacy/clipped_fraction', 1),
    'lora_aggregation_error': ('lora/aggregation_error', 1),
    'lora_mean_rank': ('lora/mean_rank', 1),  # HetLoRA's self-pruning.
    'round_s': ('time/seconds_per_round', 1),
}


class TensorBoard(loop.Callback):
  """Scalars of every round in `logdir` (round 0 at step 0), as TensorBoard event files
  (tensorboardX: no TensorFlow needed); DP diagnostics under `diagnostics/`. On resume, steps
  after the checkpoint are purged from view (a fresh run purges every step: an earlier
  attempt that died before its first checkpoint)."""
  phase = 'write'

  def __init__(self, logdir: str):
    self.logdir = logdir

  def on_run_start(self, state):
    import tensorboardX  # Imported late: only runs that log pay for it.
    done = int(state.round)
    self.writer = tensorboardX.SummaryWriter(  # One file per start: a restart adds one.
        self.logdir, purge_step=done + 1 if done else 0,
        filename_suffix=f'.from_round_{done + 1 if done else 0}')

  def on_round_end(self, round_index, state, metrics, record):
    diagnostics = record.get('diagnostics', {})
    for key, (tag, scale) in TENSORBOARD_TAGS.items():
      if record.get(key) is not None:
        self.writer.add_scalar(tag, float(record[key]) * scale, round_index)
      elif diagnostics.get(key) is not None:
        self.writer.add_scalar(f'diagnostics/{tag}', float(diagnostics[key]) * scale,
                               round_index)
    self.writer.flush()

  def on_round_zero(self, state, record):
    self.on_round_end(0, state, None, record)

  def on_run_end(self, state):
    self.writer.close()


def _four_digits(value: float) -> str:
  """271.3, 9.87, 1.234; a whole number from 10,000."""
  return f'{value:.4g}' if value < 1e4 else f'{value:.0f}'


# The console's name of a task's headline metric (its `Task.metrics[0]`) and how its value
# shows; another metric shows under its name less `test_`, to 4 decimals.
HEADLINES = {'test_accuracy': ('acc', lambda value: f'{value:.4f}'),
             'test_perplexity': ('ppl', _four_digits)}


class Console(loop.Callback):
  """A progress line every round: the headline metric (when evaluated), loss, traffic,
  time, ETA; and round 0's: the initial model's headline metric.

  `headline`: the task's headline metric, the first of its `Task.metrics`: `test_accuracy`
  shows as `acc 0.6250` (image classification), `test_perplexity` as `ppl 271.3` (text,
  where next-token accuracy would mislead).
  """
  phase = 'write'

  def __init__(self, rounds: int, headline: str = 'test_accuracy'):
    self.rounds, self.headline = rounds, headline
    self.label, self.show = HEADLINES.get(
        headline, (headline.removeprefix('test_'), HEADLINES['test_accuracy'][1]))

  def on_run_start(self, state):
    self.seconds = []

  def on_round_end(self, round_index, state, metrics, record):
    self.seconds.append(record['round_s'])
    # Under DP the counts are diagnostics, and the round released its noise anyway.
    if record.get('clients_reported') == 0 and not record['clients_nonfinite']:
      console.say(f'round {round_index}: no sampled client reported an update with '
                  f'examples ({int(metrics.num_sampled)} sampled); the model is unchanged')
    diagnostic = 'train_loss' not in record
    value = record['diagnostics']['train_loss'] if diagnostic else record['train_loss']
    loss = ('loss   -   ' if value is None else f'loss {value:.4f}') + (
        ' (diagnostic)' if diagnostic else '')
    line = (self._head(round_index, record) + f'  {loss}'
            f'  sent {record["bytes_cumulative"] / MIB:.2f} MiB'
            f'  {record["round_s"]:.1f} s/round'
            f'  eta {np.mean(self.seconds) * (self.rounds - round_index):.0f} s')
    console.say(line)

  def on_round_zero(self, state, record):
    console.say(self._head(0, record) + '  the initial model, before training')

  def _head(self, round_index: int, record) -> str:
    """'round    2/10  acc 0.6250' (and '  eps 1.2' under DP): how every line starts."""
    value = record.get(self.headline)
    shown = (f'{self.label} {self.show(value)}' if value is not None
             else f'{self.label}    -  ')
    return (f'round {round_index:4d}/{self.rounds}  ' + shown
            + (f'  eps {float(record["epsilon"]):.3g}' if 'epsilon' in record else ''))


class Checkpoint(loop.Callback):
  """Saves the server state and every stateful callback's values (under its `name`, in the
  order of `stateful`) every `every` rounds and after the last, so a restart continues
  exactly; and, when a `loop.Stop` ended the run on a round that was not due, that round."""
  phase = 'persist'

  def __init__(self, checkpointer: resume.RunCheckpointer, config, every: int, rounds: int,
               stateful: Sequence[loop.Stateful]):
    names = [c.name for c in stateful]
    if len(set(names)) < len(names):
      raise ValueError(f'stateful callbacks share a name ({names}): each needs its own, the '
                       "key of its values in the checkpoint")
    self.checkpointer, self.config = checkpointer, config
    self.every, self.rounds, self.stateful = every, rounds, stateful
    self.saved_round = None

  def on_run_start(self, state):
    self.saved_round = int(state.round)  # Restored from there, or 0: nothing to save.

  def on_round_end(self, round_index, state, metrics, record):
    if is_due(round_index, self.every, self.rounds):
      self._save(state)

  def on_run_end(self, state):
    if int(state.round) != self.saved_round:
      self._save(state)

  def _save(self, state):
    self.checkpointer.save(state, {c.name: c.state_dict() for c in self.stateful},
                           self.config)
    self.saved_round = int(state.round)


class ExportTrainable(loop.Callback):
  """The trained parameters as an official-layout `.npz`, written when the run ends."""
  phase = 'persist'

  def __init__(self, path: str):
    self.path = path

  def on_run_end(self, state):
    resume.export_trainable(self.path, state.trainable)


class ExportMerged(loop.Callback):
  """`merged.npz`, written when the run ends: what a LoRA rule that merges updates into
  the adapted kernels (fedex, flora, flexlora) serves beyond trainable.npz, the float32
  delta of every adapted kernel in trainable.npz's flat layout (`build.merged_deltas`).
  Computed on every process (its arrays are gathered whole), written by process 0."""
  phase = 'persist'

  def __init__(self, path: str, merged, primary: bool = True):
    self.path, self.merged, self.primary = path, merged, primary

  def on_run_end(self, state):
    deltas = self.merged(state)
    if self.primary:
      np.savez(self.path, **deltas)


def standard(experiment, config, workdir: str, checkpointer: resume.RunCheckpointer,
             primary: bool, ledger: PrivacyLedger | None = None) -> list[loop.Callback]:
  """The callbacks of a training run in `workdir`, in phase order (`loop.in_phase_order`);
  within a phase, in the order listed here.

  experiment: a `build.Experiment` (`num_trainable`, `evaluate`, `privacy`).
  primary: whether this is process 0, which alone writes files; every process saves its
    shards of the checkpoints.
  ledger: the privacy ledger `build` set the noise from (`restore_ledger`); DP runs only.
  The checkpoint holds the values of every `loop.Stateful` listed, under its name. The
  console shows the task's headline metric (`build.task(config).metrics[0]`).
  """
  fl, rounds = config.fl, config.fl.rounds
  callbacks = [
      Traffic(experiment.num_trainable, ALGORITHMS.get(fl.algorithm).trees_per_transfer,
              getattr(experiment, 'client_bytes', None)),
      RoundSummary(experiment.num_trainable)]
  if config.dp.mode != 'client':  # Under client DP the noised update is released anyway.
    callbacks.append(StopIfAllNonFinite(checkpointer.directory))
  callbacks.append(Evaluation(experiment.evaluate, fl.eval_every, rounds,
                              getattr(experiment, 'served', None)))
  if experiment.privacy is not None:
    callbacks += [Privacy(experiment.privacy, fl.eval_every, rounds, ledger),
                  SeparateDiagnostics()]
  callbacks += extra_callbacks.make_all(config, experiment)  # `callbacks.extra` by name.
  callbacks.append(RoundClock())  # Last of the compute phase: its time includes the above.
  if primary:  # Files written once, by process 0.
    callbacks += [MetricsLog(os.path.join(workdir, 'metrics.jsonl')),
                  TensorBoard(os.path.join(workdir, 'tb')),
                  Console(rounds, build.task(config).metrics[0])]
  stateful = [c for c in callbacks if isinstance(c, loop.Stateful)]
  callbacks.append(Checkpoint(checkpointer, config, config.checkpoint.every, rounds,
                              stateful))
  if primary:
    callbacks.append(ExportTrainable(os.path.join(workdir, 'trainable.npz')))
  if getattr(experiment, 'merged', None) is not None:
    callbacks.append(ExportMerged(os.path.join(workdir, 'merged.npz'), experiment.merged,
                                  primary))
  return loop.in_phase_order(callbacks)
