"""Reports that train nothing: masks (every method's trainable parameters) and privacy."""
import json

import pytest

from fedpeft_jax import configs
from fedpeft_jax.experiment import reports
from tests.conftest import launch, tiny_config

# The paper's implementation: ViT-B/16, 100 classes.
PAPER_COUNTS = {'full': 85_875_556, 'head': 76_900, 'bias': 179_812,
                'prompt': 169_060, 'adapter': 225_220}


def test_vit_b16_trainable_counts_match_the_paper():
  report = reports.mask_report(configs.base_config())
  assert {m: report[m]['trainable'] for m in PAPER_COUNTS} == PAPER_COUNTS
  assert report['full']['total'] == PAPER_COUNTS['full']
  assert report['bias']['bytes_per_transfer'] == 4 * PAPER_COUNTS['bias']
  assert 'head/kernel' in report['prompt']['trainable_paths']
  # LoRA rank 8 on query and value of 12 blocks, plus the head.
  assert report['lora']['trainable'] == 12 * 2 * (768 * 8 + 8 * 768) + 76_900


def test_mask_mode_prints_table_and_writes_json(tmp_path):
  result = launch(tmp_path, '--mode=masks', config='experiments/cifar100_vit_b16.py')
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert '179,812' in out and '85,875,556' in out
  report = json.loads((tmp_path / 'masks.json').read_text())
  assert report['adapter']['trainable'] == PAPER_COUNTS['adapter']
  assert set(report['head']['trainable_paths']) == {'head/bias', 'head/kernel'}
  assert 'Traceback' not in result.stderr and 'INFO' not in result.stderr


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
