"""Clients sharded over 8 (fake CPU) devices give the single-device result, and so do the
frozen weights split over a 'model' axis (`fl.model_parallel`)."""
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from tests.conftest import REPO, tiny_config

SCRIPT = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax, numpy as np
    from jax.sharding import Mesh
    from fedpeft_jax.federated import aggregators, client as client_lib, types
    from tests.conftest import Scaffold, fedavg_round, linear_loss_fn, linear_problem

    assert len(jax.devices()) == 8
    dataset, parts, trainable, frozen = linear_problem(sizes=tuple(range(5, 21)))
    table = types.ClientTable.from_partition(parts)
    results = []
    settings = [{}, {'aggregator': aggregators.dp_fedavg(clip_norm=0.1, noise_multiplier=1.0,
                                                         expected_clients=8)},
                {'scaffold': Scaffold(0.1)}]
    for mesh in (None, Mesh(np.array(jax.devices()), ('clients',))):
      for setting in settings:
        algorithm = fedavg_round(
            linear_loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=2, batch_size=4,
            max_examples=table.max_examples, clients_per_round=8, num_clients=len(parts),
            mesh=mesh, **setting)
        apply = jax.jit(algorithm.apply)
        state = algorithm.init(trainable, jax.random.key(0))
        hlo = apply.lower(state, frozen, dataset, table).compile().as_text()
        for _ in range(3):
          state, _ = apply(state, frozen, dataset, table)
        results.append(((state.trainable, state.algorithm_state),
                        'all-gather' in hlo or 'all-reduce' in hlo))
    for single, sharded in zip(results[:3], results[3:]):
      assert not single[1] and sharded[1], 'the sharded round must communicate across devices'
      diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                              single[0], sharded[0])))
      assert diff < 1e-5, diff
    print('OK')
''')


def test_sharded_round_equals_single_device_round():
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')


# A tiny random Llama with LoRA on q and v: every dimension a multiple of 4, so each kernel
# and the embedding split over a model axis of 2 or 4 (head_dim 4, 4 heads, 2 kv heads).
MODEL_PARALLEL_SCRIPT = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import types as pytypes
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from fedpeft_jax import configs, peft, validation
    from fedpeft_jax.experiment import build
    from fedpeft_jax.federated import client as client_lib, types
    from fedpeft_jax.tasks import causal_lm
    from tests.conftest import fedavg_round

    jax.config.update('jax_default_matmul_precision', 'highest')
    config = configs.base_config('lora')
    config.model.family = 'llama'
    config.model.dtype = 'float32'
    config.model.hf_config = {
        'model_type': 'llama', 'vocab_size': 48, 'hidden_size': 16, 'intermediate_size': 32,
        'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
        'rms_norm_eps': 1e-5, 'rope_theta': 10000.0, 'tie_word_embeddings': True}
    config.fl.clients_per_round = 8
    config.eval.batch_size = 4
    model = build.build_model(config)
    lora = lambda path: 'lora' in jax.tree_util.keystr(path)
    rng = np.random.default_rng(0)
    sizes = (3, 9, 4, 7, 5, 6, 2, 8, 5, 4)
    n, length = sum(sizes), 12
    ids = rng.integers(3, 48, (n, length)).astype(np.int32)
    mask = (np.arange(length) < rng.integers(4, length + 1, (n, 1))).astype(np.uint8)
    mask[:, 0] = 0
    dataset = {'input_ids': ids * mask + (1 - mask) * 2, 'loss_mask': mask}
    bounds = np.cumsum((0,) + sizes)
    table = types.ClientTable.from_partition(
        [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
    test_set = pytypes.SimpleNamespace(features={k: v[:10] for k, v in dataset.items()})
    loss_fn = causal_lm.make_loss_fn(model)

    def run(model_parallel, schedule, client_chunk=None):
      config.fl.model_parallel = model_parallel
      config.fl.shard_clients = model_parallel > 1  # 1: no mesh, one device.
      validation.validate(config, needs_weights=False, needs_data=False)
      mesh = build.client_mesh(config)
      place = build.replicate_on(mesh)
      # Made on the mesh: frozen weights split from the start, LoRA whole on every device.
      params = build.init_params(config, model, jax.random.key(0), mesh)
      trainable, frozen = peft.split(params, peft.labels('lora', params,
                                                         **build.peft_options(config)))
      assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(trainable))
      placed = build.shard_frozen_on(mesh)(frozen)
      assert all(a is b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(frozen)))
      # A checkpoint's weights come as numpy: placed the same way.
      from_host = build.shard_frozen_on(mesh)(jax.tree.map(np.asarray, frozen))
      assert jax.tree.map(lambda x: x.sharding, from_host) == jax.tree.map(
          lambda x: x.sharding, placed)
      # B of LoRA starts at zero: perturbed, every weight's gradient depends on every other.
      trainable = jax.tree_util.tree_map_with_path(
          lambda path, x: x + 0.05 if lora(path) else x, trainable)
      algorithm = fedavg_round(
          loss_fn, client_lib.sgd(0.5, 0.9, 0.0), num_epochs=1, batch_size=2,
          max_examples=table.max_examples, clients_per_round=8, num_clients=len(sizes),
          mesh=mesh, schedule=schedule, client_chunk=client_chunk)
      state = place(algorithm.init(trainable, jax.random.key(1)))
      args = (placed,) + place((dataset, table))
      apply = jax.jit(algorithm.apply)
      for _ in range(2):
        state, _ = apply(state, *args)
      evaluate = causal_lm.make_test_evaluation(config, model, placed, test_set, place,
                                                state.trainable)
      return mesh, placed, (trainable, state.trainable), evaluate(state.trainable)

    # The schedules give the same sums (tests/test_fedavg.py); 'padded' compiles faster.
    no_mesh, whole, (initial, single), single_metrics = run(1, 'padded')
    assert no_mesh is None
    # Chunks of 2 clients: a multiple of the 2 rows of (clients 2, model 4), not of 8 devices.
    for model_parallel, schedule, chunk in ((2, 'packed', None), (4, 'padded', 2)):
      mesh, placed, (_, sharded), metrics = run(model_parallel, schedule, chunk)
      # The same values as made on one device.
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole),
                                                      jax.tree.leaves(placed)))
      assert dict(mesh.shape) == {'clients': 8 // model_parallel, 'model': model_parallel}
      specs = {jax.tree_util.keystr(p): x.sharding.spec
               for p, x in jax.tree_util.tree_leaves_with_path(placed)}
      split = {k for k, spec in specs.items() if 'model' in spec}
      # Every kernel and the embedding table split, the RMSNorm scales whole.
      assert split == {k for k in specs if 'kernel' in k or 'embedding' in k}, specs
      assert len(split) == 15, split
      layer = placed['model']['layers']['0']
      # Of a kernel's equal dimensions the output features; else the largest.
      assert layer['self_attn']['q_proj']['kernel'].sharding.spec == P(None, 'model')
      assert layer['mlp']['down_proj']['kernel'].sharding.spec == P('model')
      shard = layer['mlp']['up_proj']['kernel'].addressable_shards[0].data.shape
      assert shard == (16, 32 // model_parallel), shard
      diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                              single, sharded)))
      assert 0 < max(float(np.abs(a - b).max()) for a, b in zip(
          jax.tree.leaves(single), jax.tree.leaves(initial)))  # It trained.
      assert diff < 1e-5, (model_parallel, diff)
      for key, value in single_metrics.items():
        assert abs(value - metrics[key]) < 1e-5 * max(1.0, abs(value)), (key, value, metrics)
    print('OK')
''')


def test_frozen_weights_split_over_a_model_axis_give_the_single_device_round():
  """fl.model_parallel 2 and 4 on 8 fake devices: (clients 4, model 2) and (2, 4) meshes,
  the tiny decoder's kernels and embedding split over 'model', two LoRA rounds and the
  test evaluation equal to the run with the frozen weights whole on every device."""
  result = subprocess.run([sys.executable, '-c', MODEL_PARALLEL_SCRIPT], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')


@pytest.mark.parametrize('shape,model_parallel,spec', [
    ((16, 16), 2, P(None, 'model')),  # Equal dimensions: the last, output features.
    ((32, 16), 4, P('model')),  # The largest one they divide.
    ((6, 10), 4, P()),  # Neither divides: whole on every device.
    ((10, 8), 4, P(None, 'model')),  # The largest one they divide, not the largest.
    ((3, 3, 3, 8), 2, P(None, None, None, 'model')),  # A conv kernel: its channels.
    ((2, 2), 4, P()),  # Fewer rows than devices.
    ((64,), 2, P()),  # Vectors (norm scales, biases) stay whole.
    ((), 2, P())])
def test_model_axis_spec_splits_the_largest_divisible_dimension(shape, model_parallel, spec):
  assert build.model_axis_spec(shape, model_parallel) == spec


def test_model_parallel_must_be_positive_and_divide_the_devices():
  config = tiny_config()
  validation.validate(config)  # Default 1.
  config.fl.model_parallel = 0
  with pytest.raises(validation.ConfigError, match=r'^--config.fl.model_parallel=0: must be '
                     r'an int >= 1'):
    validation.validate(config)
  devices = jax.device_count()
  config.fl.model_parallel = devices + 1
  with pytest.raises(validation.ConfigError, match=rf'^--config.fl.model_parallel='
                     rf'{devices + 1}: must divide the device count, {devices} ') as e:
    validation.validate(config)
  assert '\n' not in str(e.value)
  # Counting masks or privacy needs no devices: not checked there.
  validation.validate(config, needs_weights=False)
