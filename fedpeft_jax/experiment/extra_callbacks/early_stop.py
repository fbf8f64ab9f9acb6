"""`early_stop`: ends a run whose headline test metric (the task's first: `test_accuracy`
for images, higher is better; `test_perplexity` for text, lower is better) has not improved
for `early_stop_patience` evaluations. Its best value and wait travel in the run
checkpoint, so a resumed run keeps counting."""
from __future__ import annotations

from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import loop
from fedpeft_jax.experiment.extra_callbacks import CALLBACKS, CallbackSpec


class EarlyStop(loop.Stateful):
  name = 'early_stop'  # Its values' key in the run checkpoint.
  phase = 'compute'  # Adds to the record, after the evaluation it reads.

  def __init__(self, patience: int, metric: str = 'test_accuracy', larger_is_better=True):
    self.patience, self.metric, self.sign = patience, metric, 1.0 if larger_is_better else -1.0
    self.best, self.waited = None, 0

  def on_round_end(self, round_index, state, metrics, record):
    if record.get(self.metric) is None:
      return None  # Not an evaluated round: adds nothing.
    value = self.sign * float(record[self.metric])
    if self.best is None or value > self.best:
      self.best, self.waited = value, 0
    else:
      self.waited += 1
    if self.waited >= self.patience:
      return loop.Stop(f'no better {self.metric} in {self.patience} evaluations')
    return None

  def state_dict(self):
    return {'best': self.best, 'waited': self.waited}

  def load_state_dict(self, saved):
    self.best, self.waited = saved['best'], saved['waited']


# Headline metrics where lower is better; any other improves upwards.
LOWER_IS_BETTER = ('test_perplexity', 'test_loss')


def make(options, experiment) -> EarlyStop:
  """EarlyStop on the headline metric of the task `experiment.config`'s model serves."""
  metric = build.task(experiment.config).metrics[0]
  return EarlyStop(options['early_stop_patience'], metric,
                   larger_is_better=metric not in LOWER_IS_BETTER)


def _check(options):
  patience = options['early_stop_patience']
  if not (isinstance(patience, int) and patience >= 1):
    return 'early_stop_patience', 'must be an integer >= 1'
  return None


CALLBACKS.register('early_stop', CallbackSpec(
    make=make,
    summary="stop when the task's headline test metric (accuracy; perplexity for text) has "
            'not improved for a few evaluations',
    options={'early_stop_patience': 3}, check=_check))
