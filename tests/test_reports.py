"""Reports that train nothing: masks (every method's trainable parameters) and privacy."""
import json

import pytest

from fedpeft_jax import configs
from fedpeft_jax import peft
from fedpeft_jax.experiment import reports
from tests.conftest import launch, tiny_config
from tests.test_launch import _one_error_line

# The paper's implementation: ViT-B/16, 100 classes.
PAPER_COUNTS = {'full': 85_875_556, 'head': 76_900, 'bias': 179_812,
                'prompt': 169_060, 'adapter': 225_220}
NOTHING = dict.fromkeys(reports.PARAMETER_GROUPS, 0)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def test_vit_b16_trainable_counts_match_the_paper():
  report = reports.mask_report(configs.base_config())
  assert {m: report[m]['trainable'] for m in PAPER_COUNTS} == PAPER_COUNTS
  assert report['full']['total'] == PAPER_COUNTS['full']
  assert report['bias']['bytes_per_transfer'] == 4 * PAPER_COUNTS['bias']
  assert 'head/kernel' in report['prompt']['trainable_paths']
  # LoRA rank 8 on query and value of 12 blocks, plus the head.
  assert report['lora']['trainable'] == 12 * 2 * (768 * 8 + 8 * 768) + 76_900
  assert report['lora']['groups'] == {**NOTHING, 'head': 76_900,
                                      'peft_additions': 12 * 2 * (768 * 8 + 8 * 768)}
  # BitFit on ViT-B/16: the biases of q, k, v, out (768 each), of the MLP (3072 + 768) and
  # of both LayerNorms in 12 blocks, the final LayerNorm's and the patch embedding's.
  assert report['bias']['groups'] == {
      **NOTHING, 'patch_embedding': 768, 'attention': 12 * 4 * 768,
      'mlp': 12 * (3072 + 768), 'layernorm': 12 * 2 * 768 + 768, 'head': 76_900}
  # Full: 16x16x3 patches, 197 positions + cls, 4 attention and 2 MLP dense layers and 2
  # LayerNorms (scale and bias) a block.
  assert report['full']['groups'] == {
      'patch_embedding': 16 * 16 * 3 * 768 + 768, 'position_and_cls': 197 * 768 + 768,
      'attention': 12 * 4 * (768 * 768 + 768),
      'mlp': 12 * (768 * 3072 + 3072 + 3072 * 768 + 768),
      'layernorm': 12 * 2 * 2 * 768 + 2 * 768, 'head': 76_900, 'peft_additions': 0}


def test_mask_mode_prints_table_and_writes_json(tmp_path):
  result = launch(tmp_path, '--mode=masks', config='experiments/cifar100_vit_b16.py')
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert '179,812' in out and '85,875,556' in out
  report = json.loads((tmp_path / 'masks.json').read_text())
  assert report['adapter']['trainable'] == PAPER_COUNTS['adapter']
  assert set(report['head']['trainable_paths']) == {'head/bias', 'head/kernel'}
  assert 'Traceback' not in result.stderr and 'INFO' not in result.stderr


def _masks(methods: str) -> dict:
  config = tiny_config()
  config.peft.method = methods
  return reports.mask_report(config)


def test_the_groups_of_every_method_add_up_to_its_trainable_count():
  config = tiny_config()
  config.peft.adapter_shared = False  # An adapter in every block, under encoderblock_i/.
  config.peft.method = ','.join(peft.METHODS + ('bias+adapter+prompt+lora',))
  report = reports.mask_report(config)
  assert list(report) == list(peft.METHODS) + ['bias+adapter+prompt+lora']
  for method, r in report.items():
    assert list(r['groups']) == list(reports.PARAMETER_GROUPS)
    assert sum(r['groups'].values()) == r['trainable'], method
  assert report['full']['trainable'] == report['full']['total']
  # Adapters (4 leaves a block), prompts (1) and LoRA (4 a block) are additions, no more.
  additions = [p for p in report['bias+adapter+prompt+lora']['trainable_paths']
               if 'adapter' in p or 'prompt' in p or 'lora_' in p]
  assert len(additions) == 2 * 4 + 1 + 2 * 4


def test_bias_trains_the_biases_of_every_group_of_the_test_vit():
  # vit_test: hidden 32, MLP 64, 2 blocks of 2 heads x 16, 4x4 patches, 4 classes.
  assert _masks('bias,head')['bias']['groups'] == {
      **NOTHING, 'patch_embedding': 32,
      'attention': 2 * (3 * 2 * 16 + 32),  # q, k, v per head; out.
      'mlp': 2 * (64 + 32), 'layernorm': 2 * 2 * 32 + 32,  # And the final LayerNorm.
      'head': 32 * 4 + 4}


def test_two_methods_are_diffed_by_parameter_path():
  report = _masks('bias,lora')
  blocks = [f'Transformer/encoderblock_{i}' for i in (0, 1)]
  biases = [f'{b}/{layer}/bias' for b in blocks for layer in (
      'LayerNorm_0', 'LayerNorm_2', 'MlpBlock_3/Dense_0', 'MlpBlock_3/Dense_1',
      *(f'MultiHeadDotProductAttention_1/{x}' for x in ('query', 'key', 'value', 'out')))]
  assert report['diff'] == {
      'bias not lora': sorted(biases + ['Transformer/encoder_norm/bias', 'embedding/bias']),
      'lora not bias': sorted(f'{b}/MultiHeadDotProductAttention_1/lora_{x}_{ab}'
                              for b in blocks for x in ('query', 'value') for ab in 'ab')}
  assert 'diff' not in _masks('bias,lora,head')


def test_mask_mode_compares_a_comma_list_of_methods(tmp_path):
  result = launch(tmp_path, '--mode=masks', '--config.peft.method=bias,lora,bias+lora,adapter')
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'masks.json').read_text())
  assert list(report) == ['bias', 'lora', 'bias+lora', 'adapter']
  assert report['bias+lora']['groups'] == {
      g: report['bias']['groups'][g] + report['lora']['groups'][g] - (g == 'head') * 132
      for g in reports.PARAMETER_GROUPS}  # The head is trained by both parts.
  table = result.stdout.split('trainable by parameter group')[1]
  assert 'peft_additions' in table
  assert [l.split()[0] for l in table.strip().splitlines()[1:]] == list(report)
  png = (tmp_path / 'masks.png').read_bytes()
  assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

  bad = launch(tmp_path, '--mode=masks', '--config.peft.method=bias,lorra')
  assert "'lorra' of the comma list must be one of" in _one_error_line(bad, 'peft.method')
  # Only masks mode compares methods; a run trains one.
  one = launch(tmp_path / 'run', '--config.peft.method=bias,lora')
  assert 'a comma list compares methods in --mode=masks' in _one_error_line(one, 'peft')


def test_privacy_report_names_the_mechanism_with_its_clip_norm(tmp_path):
  config = tiny_config('bias,dp=client')
  config.dp.clip_norm = 0.3
  report = reports.write_privacy_report(config, str(tmp_path))
  assert json.loads((tmp_path / 'privacy.json').read_text()) == report
  assert report['clip_norm'] == 0.3 and report['noise_multiplier'] == 1.0
  assert report['rounds'] == 3 and report['sampling_rate'] == 0.5
  assert report['accountant'] == 'pld' and report['sampling'] == 'poisson'
  assert 0 < report['epsilon'] < float('inf')


def test_privacy_report_without_dp_is_refused_naming_the_key(tmp_path):
  with pytest.raises(reports.validation.ConfigError, match="dp.mode='none'"):
    reports.write_privacy_report(tiny_config('bias'), str(tmp_path))
