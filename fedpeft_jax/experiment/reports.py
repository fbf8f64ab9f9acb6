"""Reports that train nothing: what each PEFT method trains and sends (by parameter group,
drawn as `masks.png`), and the epsilon a configured run will deliver."""
from __future__ import annotations

import os

import numpy as np
from flax import traverse_util

from fedpeft_jax import peft
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import workdir as workdir_lib
from fedpeft_jax.privacy import accounting


# Where a method's trainable parameters sit in the ViT, in the order the table shows them.
PARAMETER_GROUPS = ('patch_embedding', 'position_and_cls', 'attention', 'mlp', 'layernorm',
                    'head', 'peft_additions')

def _group(path: tuple[str, ...], is_addition: bool) -> str:
  if path[0] in ('head', 'pre_logits'):
    return 'head'
  if is_addition:  # Checked before attention: LoRA's leaves live in the attention module.
    return 'peft_additions'
  if path[0] == 'embedding':
    return 'patch_embedding'
  if path[0] == 'cls' or 'posembed_input' in path:
    return 'position_and_cls'
  if any(p.startswith('MultiHeadDotProductAttention') for p in path):
    return 'attention'
  if any(p.startswith('MlpBlock') for p in path):
    return 'mlp'
  if any(p.startswith('LayerNorm') or p == 'encoder_norm' for p in path):
    return 'layernorm'
  raise ValueError(f'parameter {"/".join(path)} belongs to no group of PARAMETER_GROUPS')


# The same for a Llama-family decoder (model.family 'llama'), by Hugging Face module name.
DECODER_GROUPS = ('token_embedding', 'attention', 'mlp', 'norm', 'head', 'peft_additions')


def _decoder_group(path: tuple[str, ...], is_addition: bool) -> str:
  if path[0] == 'lm_head':
    return 'head'
  if is_addition:  # Before attention and mlp: LoRA's leaves live in those modules.
    return 'peft_additions'
  for part, group in (('embed_tokens', 'token_embedding'), ('self_attn', 'attention'),
                      ('mlp', 'mlp')):
    if part in path:
      return group
  if path[-1] == 'scale':  # input_layernorm, post_attention_layernorm, norm.
    return 'norm'
  raise ValueError(f'parameter {"/".join(path)} belongs to no group of DECODER_GROUPS')


# Each model family's groups and the function placing a path in one.
FAMILY_GROUPS = {'vit': (PARAMETER_GROUPS, _group), 'llama': (DECODER_GROUPS, _decoder_group)}


def parameter_groups(params, family: str = 'vit') -> dict[str, str]:
  """Each parameter path ('Transformer/encoder_norm/bias') -> its group in the family's
  groups (`FAMILY_GROUPS`: PARAMETER_GROUPS for the ViT)."""
  # Each registered method declares the parameters it adds (`PeftMethod.adds`).
  place = FAMILY_GROUPS[family][1]
  return {'/'.join(path): place(path, peft.is_added(path))
          for path in traverse_util.flatten_dict(params)}


def group_counts(params, trainable, family: str = 'vit') -> dict[str, int]:
  """Trainable parameters per group of the family's groups (every group, zeros included)."""
  groups = parameter_groups(params, family)
  counts = dict.fromkeys(FAMILY_GROUPS[family][0], 0)
  for path, leaf in traverse_util.flatten_dict(trainable, sep='/').items():
    counts[groups[path]] += int(leaf.size)
  return counts


def compared_methods(config) -> tuple[str, ...]:
  """`peft.method` as a comma list ('bias,lora,bias+lora'), or without one every method
  the model allows (those refused on it, e.g. `bias` on a bias-free decoder, are named)."""
  method = config.peft.method
  if ',' in method:
    return tuple(method.split(','))
  size = build.model_family(config).dimensions(config)
  refused = {m: peft.check(m, config.peft, size) for m in peft.METHODS}
  refused = {m: p[1] for m, p in refused.items() if p is not None and p[0] == 'method'}
  for name, why in refused.items():
    print(f'not compared: {name} ({why})')
  return tuple(m for m in peft.METHODS if m not in refused)


def mask_report(config) -> dict:
  """Trainable counts, their groups and bytes per transfer of each compared method on the
  configured model; with exactly two methods, `diff`: the paths one trains and not the other."""
  report = {}
  for method in compared_methods(config):
    params = build.abstract_params(config, build.build_model(config, method))
    trainable, _ = peft.split(params, peft.labels(method, params,
                                                  **build.peft_options(config)))
    n = peft.count(trainable)
    report[method] = {'trainable': n, 'total': peft.count(params),
                      'bytes_per_transfer': n * callbacks.BYTES_PER_PARAM,
                      'trainable_paths': peft.paths(trainable),
                      'groups': group_counts(params, trainable, config.model.family)}
  if len(report) == 2:
    (a, paths_a), (b, paths_b) = [(m, set(r['trainable_paths'])) for m, r in report.items()]
    report['diff'] = {f'{a} not {b}': sorted(paths_a - paths_b),
                      f'{b} not {a}': sorted(paths_b - paths_a)}
  return report


def _methods(report: dict) -> list[str]:
  return [m for m in report if m != 'diff']


def plot_masks(report: dict, path: str) -> None:
  """One bar a method: its trainable count, and its groups' shares stacked.

  Counts span ~1000x (full vs PEFT), so they need a log axis, on which stacked segments
  would be distorted: the groups are stacked as shares on a linear axis of their own.
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  methods = _methods(report)
  totals = [report[m]['trainable'] for m in methods]
  fig = figure.Figure(figsize=(10, 1 + 0.4 * len(methods)), layout='constrained')
  count_ax, share_ax = fig.subplots(1, 2, sharey=True, width_ratios=(1, 2))
  count_ax.barh(methods, totals, color='gray')
  count_ax.set_xscale('log')
  count_ax.bar_label(count_ax.containers[0], [f'{n:,}' for n in totals], fontsize='small')
  count_ax.set_xlim(min(totals) / 10, max(totals) * 100)  # Room for the labels.
  count_ax.set_xlabel('trainable parameters (log scale)')
  left = np.zeros(len(methods))
  for i, group in enumerate(report[methods[0]]['groups']):
    share = np.array([report[m]['groups'][group] for m in methods]) / totals
    share_ax.barh(methods, 100 * share, left=100 * left, label=group, color=f'C{i}')
    left += share
  share_ax.set_xlim(0, 100)
  share_ax.set_xlabel('share of trainable parameters by group (%)')
  count_ax.invert_yaxis()  # The first method on top, as listed.
  fig.legend(loc='outside right center', fontsize='small', frameon=False)
  fig.savefig(path, dpi=120)


def write_mask_report(config, workdir: str) -> dict:
  report = mask_report(config)
  methods = _methods(report)
  width = max(10, *(len(m) + 2 for m in methods))
  print(f"{'method':<{width}}{'trainable':>14}{'% of total':>12}{'bytes/transfer':>18}"
        f"{'total':>16}")
  for method in methods:
    r = report[method]
    print(f"{method:<{width}}{r['trainable']:>14,}{100 * r['trainable'] / r['total']:>11.3f}%"
          f"{r['bytes_per_transfer']:>18,}{r['total']:>16,}")
  print('\ntrainable by parameter group')
  print(f"{'method':<{width}}" + ''.join(f'{g:>17}' for g in report[methods[0]]['groups']))
  for method in methods:
    print(f'{method:<{width}}' + ''.join(f'{n:>17,}' for n in report[method]['groups'].values()))
  for side, paths in report.get('diff', {}).items():
    print(f'\ntrained by {side} ({len(paths)}):' + ''.join(f'\n  {p}' for p in paths))
  workdir = workdir_lib.prepare(workdir)
  workdir_lib.write_json(os.path.join(workdir, 'masks.json'), report)
  plot_masks(report, os.path.join(workdir, 'masks.png'))
  return report


def privacy_report(spec: accounting.PrivacySpec, clip_norm: float) -> dict:
  return {'epsilon': accounting.json_safe_epsilon(accounting.epsilon(spec)),
          'delta': spec.delta,
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
