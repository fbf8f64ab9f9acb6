r"""Runs a FedPEFT experiment from an ml_collections config.

  python launch.py --config=experiments/pcam_vit_ti4.py:bias --workdir=/tmp/pcam
  python launch.py --config=experiments/cifar100_vit_b16.py:adapter --mode=masks \
      --workdir=/tmp/masks
  python launch.py --config=experiments/pcam_vit_ti4.py:bias,dp=client --mode=privacy \
      --workdir=/tmp/dp --config.dp.target_epsilon=8

Bad config values, missing data and mismatched checkpoints end the run with one
line naming the problem and exit status 2.
"""
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from fedpeft_jax import errors
from fedpeft_jax import train
from fedpeft_jax import validation

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file with an optional argument: '
    'path.py:METHOD[,dp=none|client|sample][,clients=N][,participation=F].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and outputs are written.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'masks', 'privacy'],
    'train: run the experiment; masks: trainable parameters of every PEFT method (no data, '
    'no weights); privacy: the epsilon the configured run will deliver (trains nothing).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Multi-host (TPU pod slice, multi-node GPU): call '
    'jax.distributed.initialize() first; run the same command on every host.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    mode = _MODE.value
    validation.validate(
        config, needs_weights=mode == 'train',
        needs_data=mode == 'train' or (mode == 'privacy' and config.dp.mode == 'sample'))
    if mode == 'masks':
      train.write_mask_report(config, _WORKDIR.value)
    elif mode == 'privacy':
      train.write_privacy_report(config, _WORKDIR.value)
    else:
      train.train(config, _WORKDIR.value)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except train.TrainingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
