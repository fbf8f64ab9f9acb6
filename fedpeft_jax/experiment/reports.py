"""Reports that train nothing: what each PEFT method trains and sends, and the epsilon a
configured run will deliver."""
from __future__ import annotations

import os

from fedpeft_jax import peft
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import workdir as workdir_lib
from fedpeft_jax.privacy import accounting


def mask_report(config) -> dict:
  """Trainable counts and bytes per transfer of every method on the configured model."""
  report = {}
  for method in peft.METHODS:
    params = build.abstract_params(config, build.build_model(config, method))
    trainable, _ = peft.split(params, peft.labels(method, params))
    n = peft.count(trainable)
    report[method] = {'trainable': n, 'total': peft.count(params),
                      'bytes_per_transfer': n * callbacks.BYTES_PER_PARAM,
                      'trainable_paths': peft.paths(trainable)}
  return report


def write_mask_report(config, workdir: str) -> dict:
  report = mask_report(config)
  print(f"{'method':<10}{'trainable':>14}{'% of total':>12}{'bytes/transfer':>18}")
  for method, r in report.items():
    print(f"{method:<10}{r['trainable']:>14,}{100 * r['trainable'] / r['total']:>11.3f}%"
          f"{r['bytes_per_transfer']:>18,}")
  workdir_lib.write_json(os.path.join(workdir_lib.prepare(workdir), 'masks.json'), report)
  return report


def privacy_report(spec: accounting.PrivacySpec, clip_norm: float) -> dict:
  return {'epsilon': accounting.epsilon(spec), 'delta': spec.delta,
          'noise_multiplier': spec.noise_multiplier, 'clip_norm': clip_norm,
          'sampling_rate': spec.sampling_rate, 'rounds': spec.rounds,
          'accountant': accounting.accountant_name(spec), 'mode': spec.mode,
          'sampling': spec.sampling if spec.mode == 'client' else 'without_replacement'}


def write_privacy_report(config, workdir: str) -> dict:
  """What epsilon the configured run will deliver, without training."""
  if config.dp.mode == 'none':
    raise validation.ConfigError('dp.mode', config.dp.mode,
                                 "--mode=privacy needs dp.mode='client' or 'sample'")
  sizes = ()
  if config.dp.mode == 'sample':  # The guarantee depends on every client's size.
    sizes = [len(ids) for ids in build.load_partition(config)[1]]
  report = privacy_report(build.privacy_spec(config, sizes), config.dp.clip_norm)
  for key, value in report.items():
    print(f'{key:>17}: {value}')
  workdir_lib.write_json(os.path.join(workdir_lib.prepare(workdir), 'privacy.json'), report)
  return report
