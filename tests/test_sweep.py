"""Sweeps declared in config files: points, commands, and a killed sweep resumed exactly."""
import json
import os
import signal
import time

import jax
import pytest

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.experiment import sweep
from tests.conftest import REPO, launch

TINY_FILE = str(REPO / 'experiments' / 'synthetic_tiny.py')
SHORT = ['--config.fl.rounds=3', '--config.checkpoint.every=1']


def test_grid_is_the_product_of_its_axes_last_fastest():
  assert configs.grid({'arg': ['a', 'b'], 'seed': [0, 1]}) == [
      {'arg': 'a', 'seed': 0}, {'arg': 'a', 'seed': 1},
      {'arg': 'b', 'seed': 0}, {'arg': 'b', 'seed': 1}]


def test_points_name_their_workdirs_and_configs_apply_point_then_command_line():
  module = sweep.load_module(TINY_FILE)
  points = sweep.points(module, TINY_FILE, '')
  assert [p.name for p in points] == ['head_seed-0', 'head_seed-1', 'bias_seed-0',
                                      'bias_seed-1']
  config = sweep.point_config(module, points[1], {'fl.rounds': 7})
  assert (config.peft.method, config.seed, config.fl.rounds) == ('head', 1, 7)
  assert config.optim.lr == configs.LEARNING_RATES['head']  # The method's own rate.
  with pytest.raises(sweep.SweepError, match="no config key 'fl.round'"):
    sweep.point_config(module, points[0], {'fl.round': 7})


def test_every_shipped_config_declares_a_sweep_whose_points_validate():
  from fedpeft_jax import validation
  for name in ('synthetic_tiny', 'pcam_vit_ti4', 'cifar100_vit_b16', 'pcam_vit_b16',
               'resisc45_vit_b16'):
    path = str(REPO / 'experiments' / f'{name}.py')
    module = sweep.load_module(path)
    points = sweep.points(module, path, '')
    for point in points:
      validation.validate(sweep.point_config(module, point, {}), needs_weights=False,
                          needs_data=False)
  assert len(points) == 6 * 2 * 3 * 2 * 3  # The paper's grid with 3 seeds.


def test_the_testbed_algorithm_sweep_declares_each_algorithm_with_three_seeds():
  from fedpeft_jax import validation
  path = str(REPO / 'experiments' / 'pcam_vit_ti4.py')
  module = sweep.load_module(path)
  points = sweep.points(module, path, 'algorithms')
  point_configs = [sweep.point_config(module, p, {}) for p in points]
  for config in point_configs:
    validation.validate(config, needs_weights=False, needs_data=False)
    assert (config.data.partition, config.data.alpha) == ('dirichlet', 0.5)
    assert config.fl.local_epochs == 5 and config.data.num_train_examples == 2048
  settings = {(c.peft.method, c.fl.server_optimizer, c.fl.prox_mu, c.fl.algorithm,
               c.peft.lora_freeze_a) for c in point_configs}
  assert settings == {('bias', 'sgd', 0.0, 'fedavg', False), ('bias', 'momentum', 0.0, 'fedavg', False),
                      ('bias', 'adam', 0.0, 'fedavg', False), ('bias', 'sgd', 0.01, 'fedavg', False),
                      ('bias', 'sgd', 0.0, 'scaffold', False), ('lora', 'sgd', 0.0, 'fedavg', False),
                      ('lora', 'sgd', 0.0, 'fedavg', True)}
  assert len(point_configs) == 7 * 3 and {c.seed for c in point_configs} == {0, 1, 2}
  # Names leave out the keys every point shares.
  assert [p.name for p in points[:4]] == ['bias_seed-0', 'bias_seed-1', 'bias_seed-2',
                                          'bias_server_optimizer-momentum_seed-0']
  assert points[-1].name == 'lora_lora_freeze_a-True_seed-2'
  with pytest.raises(errors.UserError, match="sweeps are 'methods', 'algorithms' and "
                     "'lora_aggregation'"):
    sweep.points(module, path, 'optimizers')


def _final_shas(root):
  shas = {}
  for point in sorted(os.listdir(root)):
    metrics = root / point / 'metrics.jsonl'
    if metrics.exists():
      lines = [json.loads(line) for line in metrics.read_text().splitlines()]
      # Round 0 (the initial model) once, then every round of SHORT's 3.
      assert [line['round'] for line in lines] == [0, 1, 2, 3], point
      shas[point] = lines[-1]['trainable_sha256']
  return shas


def test_a_killed_sweep_rerun_ends_exactly_like_an_uninterrupted_one(tmp_path):
  straight = launch(tmp_path / 'straight', '--mode=sweep', *SHORT, config=TINY_FILE,
                    wait=False)
  victim = launch(tmp_path / 'killed', '--mode=sweep', *SHORT, config=TINY_FILE, wait=False)
  deadline = time.time() + 300
  second_point = tmp_path / 'killed' / 'head_seed-1' / 'checkpoints'
  while not (second_point.exists() and any(p.isdigit() for p in os.listdir(second_point))):
    assert victim.poll() is None and time.time() < deadline, 'sweep ended before the kill'
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not (tmp_path / 'killed' / 'bias_seed-1').exists()
  resumed = launch(tmp_path / 'killed', '--mode=sweep', *SHORT, config=TINY_FILE)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'holds a finished run' in resumed.stdout  # head_seed-0 is skipped...
  assert 'resuming from round' in resumed.stdout  # ...head_seed-1 resumed.
  straight.communicate(timeout=300)
  assert straight.returncode == 0
  shas = _final_shas(tmp_path / 'straight')
  assert len(shas) == 4 and len(set(shas.values())) == 4
  assert _final_shas(tmp_path / 'killed') == shas


def test_dry_run_prints_one_runnable_command_per_point(tmp_path):
  result = launch(tmp_path, '--mode=sweep', '--sweep_dry_run', '--config.fl.rounds=2',
                  config=TINY_FILE)
  assert result.returncode == 0, result.stderr[-2000:]
  commands = result.stdout.splitlines()
  assert commands[0] == (f'python launch.py --config={TINY_FILE}:head --config.seed=0 '
                         f'--config.fl.rounds=2 --workdir={tmp_path}/head_seed-0')
  assert len(commands) == 4 and not os.listdir(tmp_path)


def test_a_bad_point_fails_before_any_point_runs(tmp_path):
  result = launch(tmp_path, '--mode=sweep', '--config.fl.clients_per_round=100',
                  config=TINY_FILE)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'sweep point head_seed-0: --config.fl.clients_per_round=100' in result.stderr
  assert not (tmp_path / 'head_seed-0').exists()


def test_a_sweep_caches_its_compilations_in_its_root_unless_the_user_chose_a_cache(tmp_path):
  chosen = jax.config.values['jax_compilation_cache_dir']  # conftest chose one.
  assert chosen and sweep.use_compilation_cache(str(tmp_path)) == chosen
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    assert sweep.use_compilation_cache(str(tmp_path)) == str(tmp_path / 'xla_cache')
    assert jax.config.values['jax_compilation_cache_dir'] == str(tmp_path / 'xla_cache')
  finally:
    jax.config.update('jax_compilation_cache_dir', chosen)
