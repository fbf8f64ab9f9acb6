"""The algorithms researchers compare against, each against an independent reference:
server optimizers, FedProx, SCAFFOLD, FFA-LoRA."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import errors, peft
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import schedules, types
from fedpeft_jax.federated import server_optimizers
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated.algorithms import Algorithm, fednova, fedprox
from tests.conftest import Scaffold, fedavg_round, linear_loss_fn, linear_problem

LR, TAU = 0.05, 1e-3


def _round(loss_fn=linear_loss_fn, sizes=(5, 17, 9, 30, 12, 3), optimizer=None, **kw):
  dataset, parts, trainable, frozen = linear_problem(sizes)
  table = types.ClientTable.from_partition(parts)
  options = dict(num_epochs=2, batch_size=4, clients_per_round=4)
  options.update(kw)
  algorithm = fedavg_round(loss_fn, optimizer or client_lib.sgd(0.1, 0.9, 0.0),
                            max_examples=table.max_examples, num_clients=len(parts),
                            **options)
  return algorithm, jax.jit(algorithm.apply), (frozen, dataset, table), trainable


def _average_deltas(optimizer, rounds=3):
  """Runs `rounds` rounds with `optimizer` on the server; yields (the round's average
  delta, the server's model after it). The delta comes from a plain FedAvg round (server
  sgd at 1) from the same state, so a reference can apply it by hand."""
  algorithm, apply, args, trainable = _round(server_optimizer=optimizer)
  plain, plain_apply, _, _ = _round()
  state = algorithm.init(trainable, jax.random.key(0))
  for _ in range(rounds):
    start = plain.init(state.trainable, state.rng)._replace(round=state.round)
    mean_delta = jax.tree.map(jnp.subtract, plain_apply(start, *args)[0].trainable,
                              state.trainable)
    state, _ = apply(state, *args)
    yield mean_delta, state.trainable


@pytest.mark.parametrize('name, by_hand', [
    ('sgd', optax.sgd(LR)), ('momentum', optax.sgd(LR, momentum=0.8))])
def test_fedavg_and_fedavgm_equal_optax_applied_by_hand_to_the_average_delta(name, by_hand):
  """Optax applied by hand to minus each round's average delta gives the server's model;
  the momentum carries across rounds, so a round that forgot it would drift."""
  _, _, _, trainable = _round()
  expected, by_hand_state = trainable, by_hand.init(trainable)
  for mean_delta, model in _average_deltas(server_optimizers.server_optimizer(
      name, LR, momentum=0.8)):
    updates, by_hand_state = by_hand.update(jax.tree.map(jnp.negative, mean_delta),
                                            by_hand_state, expected)
    expected = optax.apply_updates(expected, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 model, expected)
  assert not np.allclose(model['w'], trainable['w'])


@pytest.mark.parametrize('name', ['adam', 'yogi', 'adagrad'])
def test_adaptive_server_optimizers_are_the_papers_algorithm_written_out(name):
  """Reddi et al. 2021, Algorithm 2, in numpy, with delta the average update:
  m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2 (adam), v - (1 - b2) delta^2
  sign(v - delta^2) (yogi), v + delta^2 (adagrad), from v = tau^2; x += lr m /
  (sqrt(v) + tau)."""
  b1, b2 = 0.8, 0.95
  _, _, _, trainable = _round()
  x = {k: np.asarray(v, np.float64) for k, v in trainable.items()}
  m = {k: np.zeros_like(a) for k, a in x.items()}
  v = {k: np.full_like(a, TAU**2) for k, a in x.items()}
  for mean_delta, model in _average_deltas(server_optimizers.server_optimizer(
      name, LR, b1=b1, b2=b2, eps=TAU)):
    for k in x:
      d = np.asarray(mean_delta[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * d
      v[k] = {'adam': lambda: b2 * v[k] + (1 - b2) * d**2,
              'yogi': lambda: v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2),
              'adagrad': lambda: v[k] + d**2}[name]()
      x[k] = x[k] + LR * m[k] / (np.sqrt(v[k]) + TAU)
      np.testing.assert_allclose(model[k], x[k], rtol=1e-4, atol=1e-6)
  assert not np.allclose(x['w'], trainable['w'])


def test_an_unknown_server_optimizer_is_a_user_error():
  with pytest.raises(errors.UserError, match=re.escape(
      "server optimizer 'adamw': unknown; did you mean 'adam'? choices: adagrad, adam, "
      "momentum, sgd, yogi")):
    server_optimizers.server_optimizer('adamw')


def _deterministic_loss(trainable, frozen, batch, rng):
  logits = batch['x'] @ trainable['w'] + trainable['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def test_fedprox_local_steps_follow_the_gradient_with_the_proximal_term_written_out():
  """Three full-batch steps of plain SGD on one client: each step's gradient is the
  loss's plus the gradient of (mu/2)||w - w_global||^2, taken by jax.grad of the term."""
  mu, lr = 0.7, 0.5
  dataset, parts, trainable, frozen = linear_problem(sizes=(12,))
  ids = jnp.asarray(parts[0], jnp.int32)
  run = lambda prox: jax.jit(client_lib.make_client_update(
      _deterministic_loss, optax.sgd(lr), num_epochs=3, batch_size=12, max_examples=12,
      gradient=fedprox.with_proximal_term(Algorithm(), prox).gradient))(
          trainable, frozen, dataset, ids, 12, jax.random.key(0))
  batch = jax.tree.map(lambda x: x[ids], dataset)

  def objective(w):
    proximal = sum(jnp.sum((w[k] - trainable[k])**2) for k in w)
    return _deterministic_loss(w, frozen, batch, None).mean() + mu / 2 * proximal

  w = trainable
  for _ in range(3):
    w = jax.tree.map(lambda p, g: p - lr * g, w, jax.grad(objective)(w))
  expected = jax.tree.map(jnp.subtract, w, trainable)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               run(mu).delta, expected)
  assert not np.allclose(run(0.0).delta['w'], expected['w'], atol=1e-4)


def test_a_negative_prox_mu_is_a_user_error():
  with pytest.raises(errors.UserError, match='prox_mu=-0.1: must be >= 0'):
    fedprox.with_proximal_term(Algorithm(), -0.1)


def _softmax_gradient(w, b, x, y):
  """Mean softmax cross-entropy gradient of the linear model, written out in numpy."""
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  return {'w': x.T @ p / len(y), 'b': p.mean(0)}


@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
def test_scaffold_variates_follow_the_papers_formulas_for_two_rounds(schedule):
  """Karimireddy et al. 2020, option II, in numpy: K full-batch steps of
  y -= lr (g_i(y) + c - c_i); c_i+ = c_i - c + (x - y) / (K lr); x += weighted mean of
  y - x; c += (1/N) sum over the cohort of (c_i+ - c_i). Clients outside the cohort
  keep their variate."""
  lr, epochs, sizes = 0.3, 3, (5, 7, 6, 8, 4, 7)
  algorithm, apply, args, trainable = _round(
      _deterministic_loss, sizes, optax.sgd(lr), num_epochs=epochs, batch_size=8,
      clients_per_round=3, client_chunk=2, schedule=schedule, scaffold=Scaffold(lr))
  _, dataset, table = args
  x_all, y_all = np.asarray(dataset['x'], np.float64), np.asarray(dataset['y'])
  ids = [np.asarray(table.example_ids[i][:n]) for i, n in enumerate(sizes)]
  x = {k: np.asarray(v, np.float64) for k, v in trainable.items()}
  c = {k: np.zeros_like(v) for k, v in x.items()}
  c_i = [{k: np.zeros_like(v) for k, v in x.items()} for _ in sizes]
  state = algorithm.init(trainable, jax.random.key(0))
  for _ in range(2):
    state, metrics = apply(state, *args)
    cohort = [int(i) for i in metrics.clients if i >= 0]
    new_x = {k: np.zeros_like(v) for k, v in x.items()}
    change = {k: np.zeros_like(v) for k, v in x.items()}
    weights = np.array([sizes[i] for i in cohort], np.float64) / sum(sizes[i] for i in cohort)
    for i, weight in zip(cohort, weights):
      y = {k: v.copy() for k, v in x.items()}
      for _ in range(epochs):
        g = _softmax_gradient(y['w'], y['b'], x_all[ids[i]], y_all[ids[i]])
        y = {k: y[k] - lr * (g[k] + c[k] - c_i[i][k]) for k in y}
      updated = {k: c_i[i][k] - c[k] + (x[k] - y[k]) / (epochs * lr) for k in x}
      for k in x:
        new_x[k] += weight * (y[k] - x[k])
        change[k] += updated[k] - c_i[i][k]
      c_i[i] = updated
    x = {k: x[k] + new_x[k] for k in x}
    c = {k: c[k] + change[k] / len(sizes) for k in c}
    for k in x:
      np.testing.assert_allclose(state.trainable[k], x[k], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(np.mean(state.algorithm_state[k], 0), c[k], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(state.algorithm_state[k], np.stack([v[k] for v in c_i]), rtol=1e-4,
                                 atol=1e-6)
  assert 0 < sum(np.abs(v['w']).sum() > 0 for v in c_i) < len(sizes)  # Some trained.


def test_scaffold_leaves_the_variates_of_dropped_and_nonfinite_clients_alone():
  def poisoned_loss(trainable, frozen, batch, rng):  # Client data with x > 2.5 explodes.
    loss = linear_loss_fn(trainable, frozen, batch, rng)
    return jnp.where(jnp.any(batch['x'] > 2.5, axis=-1), jnp.nan, loss)

  algorithm, apply, args, trainable = _round(poisoned_loss, dropout_prob=0.3,
                                             scaffold=Scaffold(0.1))
  state = algorithm.init(trainable, jax.random.key(1))
  left_alone = 0
  for _ in range(6):
    before = np.asarray(state.algorithm_state['w'])
    state, m = apply(state, *args)
    after = np.asarray(state.algorithm_state['w'])
    moved = {i for i in range(len(before)) if not np.array_equal(before[i], after[i])}
    sampled = {int(i) for i in m.clients if i >= 0}
    reported = {int(i) for i, r in zip(m.clients, m.reported) if r}
    assert moved <= reported and len(moved) == int(m.num_reported)
    left_alone += len(sampled - moved)
    assert np.isfinite(after).all()
  assert left_alone > 0 and int(m.num_nonfinite) + int(m.num_reported) <= 4


def _lora_problem():
  """A linear classifier W0 + A B on the linear problem's features, as `peft` sees LoRA."""
  dataset, parts, _, frozen = linear_problem()
  rng = np.random.default_rng(1)
  params = {'layer': {'kernel': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                      'lora_query_a': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                      'lora_query_b': jnp.asarray(rng.normal(size=(2, 3)) * 0.1, jnp.float32)},
            'head': {'bias': jnp.zeros(3)}}

  def loss_fn(trainable, frozen, batch, rng):
    p = peft.merge(trainable, frozen)['layer']
    logits = batch['x'] @ (p['kernel'] + p['lora_query_a'] @ p['lora_query_b'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])

  return dataset, parts, params, loss_fn


@pytest.mark.parametrize('freeze_a', [True, False])
def test_ffa_lora_aggregates_to_the_average_of_the_clients_products(freeze_a):
  """With A frozen (FFA-LoRA) the server's new B A equals the example-weighted average of
  the clients' B_i A, computed from their own updates; plain LoRA averaging (A trained)
  does not, which is FFA-LoRA's point."""
  dataset, parts, params, loss_fn = _lora_problem()
  trainable, frozen = peft.split(params, peft.labels('lora', params, freeze_lora_a=freeze_a))
  assert ('lora_query_a' in trainable['layer']) != freeze_a
  assert 'lora_query_b' in trainable['layer'] and 'kernel' in frozen['layer']
  table = types.ClientTable.from_partition(parts)
  optimizer = client_lib.sgd(0.5, 0.0, 0.0)
  algorithm = fedavg_round(loss_fn, optimizer, num_epochs=3, batch_size=4,
                            max_examples=table.max_examples, clients_per_round=6,
                            num_clients=len(parts))
  state, m = jax.jit(algorithm.apply)(algorithm.init(trainable, jax.random.key(0)), frozen,
                                      dataset, table)
  update = jax.jit(client_lib.make_client_update(
      loss_fn, optimizer, num_epochs=3, batch_size=4, max_examples=table.max_examples))
  keys = types.round_keys(jax.random.key(0), 0)
  products, weights = [], []
  for c in np.asarray(m.clients):
    delta = update(trainable, frozen, dataset, table.example_ids[c], table.num_examples[c],
                   jax.random.fold_in(keys.clients, c)).delta
    local = peft.merge(jax.tree.map(jnp.add, trainable, delta), frozen)['layer']
    products.append(np.asarray(local['lora_query_a'] @ local['lora_query_b'], np.float64))
    weights.append(len(parts[c]))
  average_of_products = np.average(products, axis=0, weights=weights)
  server = peft.merge(state.trainable, frozen)['layer']
  product_of_averages = np.asarray(server['lora_query_a'] @ server['lora_query_b'])
  error = np.abs(product_of_averages - average_of_products).max()
  if freeze_a:
    assert error < 1e-5, error
  else:
    assert error > 1e-3, error


@pytest.mark.parametrize('momentum,nesterov', [(0.0, False), (0.6, False), (0.6, True)])
def test_fednova_is_the_papers_normalised_average_written_out(momentum, nesterov):
  """Wang et al. 2020, Eq. 6-7, in numpy for 2 rounds: clients of unequal sizes take
  tau_i = E * ceil(n_i / B) steps; x += (sum_i p_i a_i) * sum_i p_i delta_i / a_i, with
  a_i the total weight the client's momentum SGD put on its gradients, found here by
  running that optimizer on unit gradients. Each client holds n_i copies of one example,
  so its steps do not depend on the batch order. One client drops out of each round."""
  sizes, lr, epochs, batch = (4, 9, 16, 6), 0.2, 2, 4
  rng = np.random.default_rng(1)
  x_rows = rng.normal(size=(len(sizes), 6)).astype(np.float32)
  y_rows = rng.integers(0, 3, len(sizes))
  dataset = {'x': jnp.asarray(np.repeat(x_rows, sizes, 0)),
             'y': jnp.asarray(np.repeat(y_rows, sizes), jnp.int32)}
  bounds = np.cumsum((0,) + sizes)
  parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  table = types.ClientTable.from_partition(parts)
  trainable = {'w': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) * 0.1,
               'b': jnp.zeros(3, jnp.float32)}
  algorithm = round_lib.make_round(
      _deterministic_loss, optax.sgd(lr, momentum=momentum or None, nesterov=nesterov),
      client_lib.LocalSpec(epochs, batch, table.max_examples),
      round_lib.Cohort(len(sizes), len(sizes), dropout_prob=0.25),
      algorithm=fednova.fednova(momentum, nesterov))
  apply = jax.jit(algorithm.apply)
  state = algorithm.init(trainable, jax.random.key(5))

  def sgd_weight(steps):  # Total coefficient on unit gradients after `steps` steps.
    velocity, total = 0.0, 0.0
    for _ in range(steps):
      velocity = momentum * velocity + 1.0
      total += (1.0 + momentum * velocity) if nesterov else velocity
    return total

  x = {k: np.asarray(v, np.float64) for k, v in trainable.items()}
  dropped_any, fedavg_gap = False, 0.0
  for _ in range(2):
    state, m = apply(state, None, dataset, table)
    reporters = np.asarray(m.clients)[np.asarray(m.reported)]
    dropped_any |= len(reporters) < len(sizes)
    p = np.asarray([sizes[c] for c in reporters], np.float64)
    p /= p.sum()
    normalised, a_all = [], []
    for c in reporters:
      steps = epochs * -(-sizes[c] // batch)
      y = {k: v.copy() for k, v in x.items()}
      velocity = {k: np.zeros_like(v) for k, v in x.items()}
      for _ in range(steps):
        g = _softmax_gradient(y['w'], y['b'], x_rows[c:c + 1].astype(np.float64),
                              y_rows[c:c + 1])
        for k in y:
          velocity[k] = momentum * velocity[k] + g[k]
          y[k] -= lr * ((g[k] + momentum * velocity[k]) if nesterov else velocity[k])
      a = sgd_weight(steps)
      a_all.append(a)
      normalised.append({k: (y[k] - x[k]) / a for k in x})
    tau_eff = float(np.dot(p, a_all))
    fedavg_step = sum(pi * a * d['w'] for pi, a, d in zip(p, a_all, normalised))
    x = {k: x[k] + tau_eff * sum(pi * d[k] for pi, d in zip(p, normalised)) for k in x}
    fedavg_gap = max(fedavg_gap, float(np.abs(tau_eff * sum(
        pi * d['w'] for pi, d in zip(p, normalised)) - fedavg_step).max()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 dict(state.trainable), x)
  assert dropped_any
  # Not FedAvg: the plain weighted mean of the same updates is another step.
  assert fedavg_gap > 1e-3
