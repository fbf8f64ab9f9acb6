r"""Runs a FedPEFT experiment from an ml_collections config.

  python launch.py --config=experiments/pcam_vit_ti4.py:bias --workdir=/tmp/pcam
  python launch.py --config=experiments/cifar100_vit_b16.py:adapter --mode=masks \
      --workdir=/tmp/masks
  python launch.py --config=experiments/pcam_vit_ti4.py:lora --workdir=/tmp/x \
      --config.fl.rounds=5 --config.peft.lora_rank=4
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from fedpeft_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with an argument: path.py:method.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and outputs are written.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'masks'],
                          'train: run the experiment; masks: print and write the '
                          'trainable parameters of every PEFT method (no data, no weights).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _MODE.value == 'masks':
    train.write_mask_report(config, _WORKDIR.value)
  else:
    train.train(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
