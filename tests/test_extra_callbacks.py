"""Optional callbacks by name: one line in a config adds one, its options are config keys,
its mistakes are one line at launch; `early_stop` ends a run that stopped improving."""
import json

import pytest

from fedpeft_jax import validation
from fedpeft_jax.experiment import extra_callbacks, train
from fedpeft_jax.experiment.extra_callbacks import early_stop
from fedpeft_jax.experiment import loop
from tests.conftest import tiny_config


def test_every_registered_callback_has_its_options_in_the_config_and_passes_its_check():
  config = tiny_config()
  for name, spec in extra_callbacks.CALLBACKS.items():
    assert all(key in config.callbacks for key in spec.options), name
    assert spec.check({key: config.callbacks[key] for key in spec.options}) is None, name
    config.callbacks.extra = name
    validation.validate(config)


@pytest.mark.parametrize('extra, key, needle', [
    ('early_stp', 'callbacks.extra', "callback 'early_stp': unknown; did you mean 'early_stop'"),
    ('early_stop,early_stop', 'callbacks.extra', 'names a callback twice'),
])
def test_a_bad_extra_callback_is_one_line(extra, key, needle):
  config = tiny_config()
  config.callbacks.extra = extra
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  assert str(e.value).startswith(f'--config.{key}=') and needle in str(e.value)
  assert '\n' not in str(e.value)


def test_a_bad_option_names_its_key():
  config = tiny_config()
  config.callbacks.extra, config.callbacks.early_stop_patience = 'early_stop', 0
  with pytest.raises(validation.ConfigError,
                     match=r"^--config\.callbacks\.early_stop_patience=0: must be an integer"):
    validation.validate(config)


def test_early_stop_stops_after_patience_evaluations_without_improvement():
  stop = early_stop.EarlyStop(patience=2)
  accuracies = [0.5, 0.6, 0.6, 0.55, 0.9]
  results = [stop.on_round_end(r, None, None, {'round': r, 'test_accuracy': a})
             for r, a in enumerate(accuracies, 1)]
  assert results[:3] == [None, None, None] and isinstance(results[3], loop.Stop)
  assert stop.on_round_end(9, None, None, {'round': 9}) is None  # Not evaluated: nothing.
  restored = early_stop.EarlyStop(patience=2)
  restored.load_state_dict(json.loads(json.dumps(stop.state_dict())))
  assert (restored.best, restored.waited) == (stop.best, stop.waited)


def test_early_stop_watches_the_tasks_headline_perplexity_downwards_for_text():
  class Experiment:  # What `make` reads of a built experiment.
    def __init__(self, config):
      self.config = config
  image = early_stop.make({'early_stop_patience': 1}, Experiment(tiny_config()))
  assert (image.metric, image.sign) == ('test_accuracy', 1.0)
  text_config = tiny_config('lora')
  text_config.model.family = 'llama'
  text = early_stop.make({'early_stop_patience': 1}, Experiment(text_config))
  assert text.metric == 'test_perplexity'
  # Falling perplexity is progress; a rise after the best is a wait, and patience 1 stops.
  seen = [text.on_round_end(r, None, None, {'test_perplexity': p})
          for r, p in enumerate([270.0, 120.0, 95.0], 1)]
  assert seen == [None, None, None]
  assert isinstance(text.on_round_end(4, None, None, {'test_perplexity': 96.0}), loop.Stop)


def test_one_config_line_adds_a_callback_to_a_run(tmp_path):
  """A run with `callbacks.extra='early_stop'` and patience 1 on a model that cannot
  improve (learning rate 0) stops after its second evaluation, and says so."""
  config = tiny_config()
  config.fl.rounds, config.optim.lr, config.fl.eval_every = 6, 0.0, 1
  config.callbacks.extra, config.callbacks.early_stop_patience = 'early_stop', 1
  records = train.train(config, str(tmp_path))
  assert [r['round'] for r in records] == [0, 1, 2]  # Round 0 is no evaluation it counts.
