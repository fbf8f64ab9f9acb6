"""Clients sharded over 8 (fake CPU) devices give the single-device result."""
import subprocess
import sys
import textwrap

from tests.conftest import REPO

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
