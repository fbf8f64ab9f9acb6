"""Every experiment config, over the paper's grid, loads and validates."""
import importlib.util
import itertools

import pytest

from fedpeft_jax import configs, peft, validation
from fedpeft_jax.model import families
from tests.conftest import REPO

EXPERIMENTS = sorted((REPO / 'experiments').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _refused_on_the_model(config) -> bool:
  """Whether the config's model refuses its method (`PeftMethod.check` says 'method')."""
  size = families.MODEL_FAMILIES.get(config.model.family).dimensions(config)
  problem = peft.check(config.peft.method, config.peft, size)
  return problem is not None and problem[0] == 'method'


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: p.stem)
def test_the_grid_of_every_config_validates(path):
  module = _load(path)
  grid = itertools.product(peft.METHODS, configs.DP_MODES, ('16', '64'), ('0.125', '1.0'))
  for method, dp, clients, participation in grid:
    config = module.get_config(f'{method},dp={dp},clients={clients},'
                               f'participation={participation}')
    if _refused_on_the_model(config):  # e.g. bias on a bias-free decoder: one line instead.
      with pytest.raises(validation.ConfigError, match=f"^--config.peft.method='{method}'"):
        validation.validate(config, needs_weights=False, needs_data=False)
      continue
    validation.validate(config, needs_weights=False, needs_data=False)
    assert config.peft.method == method and config.dp.mode == dp
    assert config.fl.num_clients == int(clients)
    assert config.fl.clients_per_round == max(1, round(int(clients) * float(participation)))
    # A config file may tune its own rates per method (LEARNING_RATES, e.g. the decoder's).
    rates = {**configs.LEARNING_RATES, **getattr(module, 'LEARNING_RATES', {})}
    assert config.optim.lr == rates[method]
    assert validation.aggregation(config) == ('uniform' if dp == 'client' else 'weighted')


def test_paper_configs_have_the_paper_settings():
  for name, classes, alpha in (('cifar100_vit_b16', 100, 0.1), ('resisc45_vit_b16', 45, 0.1),
                               ('pcam_vit_b16', 2, 0.5)):
    c = _load(REPO / 'experiments' / f'{name}.py').get_config('bias')
    assert (c.model.name, c.model.image_size, c.data.num_classes) == ('vit_b16', 224, classes)
    assert (c.data.partition, c.data.alpha, c.data.min_client_size) == ('dirichlet', alpha, 10)
    assert (c.fl.num_clients, c.fl.clients_per_round, c.fl.rounds, c.fl.local_epochs,
            c.fl.batch_size) == (64, 8, 50, 10, 64)
    assert (c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (0.9, True, 1e-4)


def test_an_unknown_option_is_named():
  with pytest.raises(configs.errors.UserError, match="unknown option 'rounds'"):
    configs.base_config('bias,rounds=5')


def test_the_text_main_job_takes_the_roles_with_ten_speeches_as_clients():
  """NUM_ROLES counted independently from the shared archive's train.jsonl."""
  import collections, json, tarfile
  module = _load(REPO / 'experiments' / 'shakespeare_tiny_llama.py')
  archive = module.SHARED / 'data' / 'shakespeare_roles.tar.gz'
  if not archive.exists():
    pytest.skip(f'{archive} is missing')
  with tarfile.open(archive) as tar:
    lines = tar.extractfile('shakespeare_roles/train.jsonl').read().splitlines()
  speeches = collections.Counter(json.loads(line)['client'] for line in lines)
  assert module.NUM_ROLES == sum(n >= module.MIN_SPEECHES for n in speeches.values())
  c = module.get_config()
  assert (c.peft.method, c.model.family, c.data.partition) == ('lora', 'llama', 'natural')
  assert (c.fl.num_clients, c.fl.clients_per_round) == (module.NUM_ROLES, 16)
  assert c.data.min_client_examples == module.MIN_SPEECHES and c.fl.eval_every == 1
  points = module.get_sweep('methods')
  assert sorted({p['arg'] for p in points}) == sorted(module.DECODER_METHODS)
  assert len(points) == 3 * len(module.DECODER_METHODS)
  with pytest.raises(configs.errors.UserError,
                     match="sweeps are 'methods' and 'lora_aggregation'"):
    module.get_sweep('nope')


SWEEPS = [('pcam_vit_ti4', 'methods'), ('pcam_vit_ti4', 'algorithms'),
          ('pcam_vit_ti4', 'lora_aggregation'), ('shakespeare_tiny_llama', 'methods'),
          ('shakespeare_tiny_llama', 'lora_aggregation')]


@pytest.mark.parametrize('name,arg', SWEEPS, ids=lambda x: x)
def test_every_point_of_the_declared_sweeps_validates(name, arg):
  """Each point's config as `--mode=sweep` makes it (`sweep.point_config`) validates
  without weights or data; a LoRA rule runs only where validation allows it."""
  from fedpeft_jax.experiment import sweep
  from fedpeft_jax.federated import lora_rules
  path = REPO / 'experiments' / f'{name}.py'
  module = _load(path)
  points = sweep.points(module, str(path), arg)
  for point in points:
    config = sweep.point_config(module, point, {})
    validation.validate(config, needs_weights=False, needs_data=False)
    spec = lora_rules.LORA_RULES.get(config.peft.lora_aggregation)
    if config.peft.lora_aggregation != 'fedit':  # The refused combinations are absent.
      assert 'lora' in config.peft.method and config.fl.algorithm == 'fedavg', point.name
      assert config.dp.mode == 'none' or spec.client_dp is None, point.name
      assert config.fl.server_optimizer == 'sgd' or not spec.plain_server_step, point.name


@pytest.mark.parametrize('name', ['pcam_vit_ti4', 'shakespeare_tiny_llama'])
def test_the_lora_aggregation_sweeps_run_every_rule_and_the_mixed_rank_rules(name):
  """Issue 22's sweeps: every registered rule x 3 seeds at the config's rank, and FedIT,
  FLoRA, FlexLoRA and HetLoRA with clients of ranks 2/4/8/16 (factors at 16); cheap
  settings (PCam: the Dirichlet split with 2 local epochs, 4 rounds, 500 test images;
  Shakespeare: 10 rounds, evaluated every other); the report names their groups by rule
  and client ranks."""
  from fedpeft_jax.experiment import results, sweep
  from fedpeft_jax.federated import lora_rules
  path = REPO / 'experiments' / f'{name}.py'
  module = _load(path)
  points = sweep.points(module, str(path), 'lora_aggregation')
  made = [sweep.point_config(module, p, {}) for p in points]
  settings = {}
  for config in made:
    key = (config.peft.lora_aggregation, config.peft.lora_client_ranks, config.peft.lora_rank)
    settings.setdefault(key, []).append(config.seed)
    assert config.peft.method == 'lora' and config.dp.mode == 'none'
    if name == 'pcam_vit_ti4':
      flat = configs.flat_config(config)
      assert {k: flat[k] for k in module.LORA_AGGREGATION} == module.LORA_AGGREGATION
      assert (config.data.partition, config.data.alpha, config.data.num_train_examples) == (
          'dirichlet', 0.5, 2048)
      assert (config.fl.rounds, config.fl.local_epochs, config.data.num_test_examples) == (
          4, 2, 500)
    else:
      assert (config.data.partition, config.fl.rounds, config.fl.eval_every) == (
          'natural', 10, 2)
  rules = lora_rules.LORA_RULES.names()
  assert len(rules) == 8 and {'fedit', 'fedex', 'flora', 'fedsb'} <= set(rules)
  expected = {**{(rule, '', 8): [0, 1, 2] for rule in rules},
              **{(rule, '2,4,8,16', 16): [0, 1, 2]
                 for rule in ('fedit', 'flora', 'flexlora', 'hetlora')}}
  assert settings == expected
  flat = [{k: v for k, v in configs.flat_config(c).items() if k != 'seed'} for c in made]
  assert results.label_keys(flat) == ['peft.lora_aggregation', 'peft.lora_client_ranks']
