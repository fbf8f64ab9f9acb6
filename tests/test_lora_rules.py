"""The federated LoRA rules (`peft.lora_aggregation`, issue 22), each against its paper's
formulas written out in numpy here: two rounds of six clients of unequal sizes (one
dropped each round), the clients trained by the library's local SGD from the starts the
reference computes, then the reference's aggregation compared with the round's: the served
model's adapted weights, every client's starting factors for the next round, and the
aggregation error (0 for the exact rules, positive for FedIT).

Notation as in `lora_rules/base.py`: a map's update is s·A @ (R @) B (x @ W layout).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedpeft_jax import peft
from fedpeft_jax import resume
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import lora_rules
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated import types
from fedpeft_jax.federated.lora_rules import base
from tests.conftest import tiny_config

SCALE, RANK, DIM, CLASSES = 0.5, 4, 6, 4
SIZES = (7, 13, 4, 21, 10, 2)
HETERO = np.array([1, 2, 4, 2, 4, 1])  # Each client's rank, for the rules of mixed ranks.
RANKS = {'hetlora': HETERO, 'flexlora': HETERO, 'flora': HETERO}
EXACT = ('ffa', 'fedex', 'flora', 'fedsb', 'flexlora')
SITES = (('block', 'value'), ('layer', 'query'))  # Path order: the rules' site order.
LOCAL = dict(num_epochs=2, batch_size=4)
OPTIMIZER = client_lib.sgd(0.5, 0.0, 0.0)


def loss_fn(trainable, frozen, batch, rng):
  """Two adapted maps: 'query' [6, 4] and, ViT-like, 'value' [6, 2, 2] (B [r, 2, 2])."""
  p = peft.merge(trainable, frozen)

  def weight(parent, name):
    q = p[parent]
    a = q[f'lora_{name}_a']
    if f'lora_{name}_r' in q:
      a = a @ q[f'lora_{name}_r']
    return q[name]['kernel'] + SCALE * jnp.einsum('ir,r...->i...', a, q[f'lora_{name}_b'])

  x = batch['x']
  values = jnp.einsum('ni,ihd->nhd', x, weight('block', 'value')).reshape(x.shape[0], 4)
  logits = x @ weight('layer', 'query') + values @ p['head']['kernel'] + p['head']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def _problem(rule):
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  dataset = {'x': jnp.asarray(rng.normal(size=(n, DIM)), jnp.float32),
             'y': jnp.asarray(rng.integers(0, CLASSES, n), jnp.int32)}
  bounds = np.cumsum((0,) + SIZES)
  parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)

  def b_matrix(shape):  # Zero, or Fed-SB's fixed orthonormal rows.
    if rule != 'fedsb':
      return jnp.zeros(shape)
    q, _ = np.linalg.qr(rng.normal(size=(int(np.prod(shape[1:])), shape[0])))
    return jnp.asarray(q.T.reshape(shape), jnp.float32)

  params = {'layer': {'query': {'kernel': normal(DIM, 4) * 0.3},
                      'lora_query_a': normal(DIM, RANK) * 0.5,
                      'lora_query_b': b_matrix((RANK, 4))},
            'block': {'value': {'kernel': normal(DIM, 2, 2) * 0.3},
                      'lora_value_a': normal(DIM, RANK) * 0.5,
                      'lora_value_b': b_matrix((RANK, 2, 2))},
            'head': {'kernel': normal(4, CLASSES) * 0.1, 'bias': jnp.zeros(CLASSES)}}
  if rule == 'fedsb':
    params['layer']['lora_query_r'] = jnp.zeros((RANK, RANK))
    params['block']['lora_value_r'] = jnp.zeros((RANK, RANK))
  trainable, frozen = peft.split(params, peft.labels('lora', params, lora_aggregation=rule))
  return dataset, parts, trainable, frozen


class Run(NamedTuple):
  dataset: dict
  table: types.ClientTable
  frozen: dict
  algorithm: object
  fl_round: round_lib.FederatedRound
  apply: object
  states: list  # After 0, 1, 2 rounds.
  metrics: list  # Of rounds 1, 2.


def _make(rule, schedule='padded'):
  dataset, parts, trainable, frozen = _problem(rule)
  table = types.ClientTable.from_partition(parts)
  algorithm = base.algorithm(base.layout(trainable, frozen, SCALE, RANKS.get(rule)),
                             lora_rules.LORA_RULES.get(rule).rule)
  fl_round = round_lib.make_round(
      loss_fn, OPTIMIZER, client_lib.LocalSpec(max_examples=table.max_examples, **LOCAL),
      round_lib.Cohort(5, len(parts), dropout_prob=0.25), algorithm=algorithm,
      execution=round_lib.Execution(schedule, 3))
  return dataset, table, frozen, algorithm, fl_round, trainable


@functools.cache
def _run(rule, schedule='padded') -> Run:
  dataset, table, frozen, algorithm, fl_round, trainable = _make(rule, schedule)
  apply = jax.jit(fl_round.apply)
  states, metrics = [fl_round.init(trainable, jax.random.key(3))], []
  for _ in range(2):
    state, m = apply(states[-1], frozen, dataset, table)
    states.append(state)
    metrics.append(m)
  return Run(dataset, table, frozen, algorithm, fl_round, apply, states, metrics)


@functools.cache
def _update():
  return jax.jit(client_lib.make_client_update(loss_fn, OPTIMIZER,
                                               max_examples=max(SIZES), **LOCAL))


def _flat(tree):
  return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(tree).items()}


def _a(site):
  return site[:-1] + (f'lora_{site[-1]}_a',)


def _b(site):
  return site[:-1] + (f'lora_{site[-1]}_b',)


def _r(site):
  return site[:-1] + (f'lora_{site[-1]}_r',)


def _kernel(site):
  return site + ('kernel',)


def _product(params, site):
  """A @ (R @) B, [in, out] float64, from a flat tree holding all three."""
  a = params[_a(site)]
  if _r(site) in params:
    a = a @ params[_r(site)]
  b = params[_b(site)]
  return a @ b.reshape(b.shape[0], -1)


def _cut(params, rank):
  """HetLoRA's distribution: a client's factors are the first `rank` of the global's."""
  out = dict(params)
  for site in SITES:
    if _a(site) in out:
      out[_a(site)] = np.where(np.arange(RANK) < rank, out[_a(site)], 0)
    if _b(site) in out:
      mask = (np.arange(RANK) < rank).reshape((RANK,) + (1,) * (out[_b(site)].ndim - 1))
      out[_b(site)] = np.where(mask, out[_b(site)], 0)
  return out


def _train(run, start, frozen, client, keys):
  """The library's local SGD of `client` from the flat trees `start` and `frozen`."""
  unflat = lambda flat: traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  out = _update()(unflat(start), unflat(frozen), run.dataset,
                  run.table.example_ids[client][:max(SIZES)], run.table.num_examples[client],
                  jax.random.fold_in(keys.clients, client))
  return {k: start[k] + v for k, v in _flat(out.delta).items()}


def _svd_product(dense, rank):
  """The best rank-`rank` approximation of `dense` (Eckart-Young), float64."""
  u, s, vt = np.linalg.svd(dense, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _flora_a(rng, next_round, index, shape):
  """FLoRA's fresh A: He-uniform, key fold_in(fold_in(fold_in(run key, 0xF10A), round), site)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, 0xF10A), next_round),
                           index)
  return np.asarray(jax.nn.initializers.he_uniform()(key, shape, jnp.float32), np.float64)


class Reference:
  """A rule's two rounds in numpy (float64), after its paper; see each branch of `step`."""

  def __init__(self, rule, run):
    self.rule, self.run = rule, run
    self.trainable = _flat(run.states[0].trainable)
    self.frozen = _flat(run.frozen)  # The pretrained kernels and frozen factors.
    self.merged = {site: np.zeros((DIM, 4)) for site in SITES}  # FedEx's residuals, FLoRA's merges.
    self.w_g = {site: _product({**self.frozen, **self.trainable}, site) for site in SITES}
    self.own_b = {c: {site: self.trainable[_b(site)] for site in SITES}
                  for c in range(len(SIZES))} if rule == 'fedsa' else {}  # FedSA-LoRA's.
    self.ranks = RANKS.get(rule, np.full(len(SIZES), RANK))

  def start(self, client):
    """The trainable tree `client` starts its round from."""
    params = dict(self.trainable)
    if self.rule == 'fedsa':
      params.update({_b(site): b for site, b in self.own_b[client].items()})
    return _cut(params, self.ranks[client])

  def kernels(self):
    """The frozen tree the clients train with: FedEx and FLoRA add s x their merges."""
    return {k: v + SCALE * self.merged[k[:-1]].reshape(v.shape) if k[:-1] in SITES else v
            for k, v in self.frozen.items()}

  def step(self, round_index, finals, p, library_trainable):
    """Aggregates `finals` (client -> flat trainable) with weights `p` (client -> p_i);
    returns the served model's adapted weights W + s·ΔW per site, float64 [in, out]."""
    rule, kernels_before = self.rule, self.kernels()
    weighted = lambda f: sum(p[c] * f(c) for c in finals)
    products = {c: {site: _product({**self.frozen, **finals[c]}, site) for site in SITES}
                for c in finals}
    self.ideal = {site: weighted(lambda c: products[c][site]) for site in SITES}
    # FedIT, FFA-LoRA, Fed-SB, FedEx-LoRA: every trained leaf the p-weighted mean.
    new = {k: weighted(lambda c: finals[c][k]) for k in self.trainable}
    if rule == 'fedex':  # W += s (Σp_i A_i B_i − Ā B̄)
      for site in SITES:
        self.merged[site] = self.merged[site] + self.ideal[site] - _product(
            {**self.frozen, **new}, site)
    elif rule == 'flora':  # W += s Σp_i A_i B_i; fresh A, zero B.
      for index, site in enumerate(SITES):
        self.merged[site] = self.merged[site] + self.ideal[site]
        new[_a(site)] = _flora_a(self.run.states[0].rng, round_index + 2, index, (DIM, RANK))
        new[_b(site)] = np.zeros_like(new[_b(site)])
    elif rule == 'flexlora':  # W_g = Σp_i A_i B_i; factors its rank-R truncated SVD.
      for site in SITES:
        self.w_g[site] = self.ideal[site]
        _check_balanced_svd_factors(library_trainable, site, self.ideal[site], RANK)
        new[_a(site)], new[_b(site)] = (library_trainable[_a(site)],
                                        library_trainable[_b(site)])
    elif rule == 'hetlora':  # Zero-padded factors, weights ‖A_i B_i‖_F per map.
      for site in SITES:
        norms = {c: np.linalg.norm(products[c][site]) for c in finals}
        for path in (_a(site), _b(site)):
          new[path] = sum(norms[c] * finals[c][path] for c in finals) / sum(norms.values())
    elif rule == 'fedsa':  # A averaged; each B_i kept by its client; served B = Σp_i B_i.
      for c in finals:
        self.own_b[c] = {site: finals[c][_b(site)] for site in SITES}
    self.trainable = new
    served = {}
    for site in SITES:
      update = self.w_g[site] if rule == 'flexlora' else _product({**self.frozen, **new}, site)
      served[site] = self.kernels()[_kernel(site)].reshape(DIM, -1) + SCALE * update
    self.before = {site: kernels_before[_kernel(site)].reshape(DIM, -1) for site in SITES}
    return served

  def error(self, served):
    """mean over maps of ‖Σp_i A_i B_i − (served − W_clients) / s‖ / ‖Σp_i A_i B_i‖."""
    return np.mean([np.linalg.norm(self.ideal[s] - (served[s] - self.before[s]) / SCALE)
                    / np.linalg.norm(self.ideal[s]) for s in SITES])


def _check_balanced_svd_factors(trainable, site, dense, rank):
  """FlexLoRA's factors of W_g: A @ B its best rank-r approximation, A = U_r sqrt(S_r),
  B = sqrt(S_r) V_r^T, so AᵀA = BBᵀ = S_r (the sign of each singular pair is free)."""
  a, b = trainable[_a(site)], trainable[_b(site)].reshape(rank, -1)
  np.testing.assert_allclose(a @ b, _svd_product(dense, rank), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(a.T @ a, b @ b.T, rtol=1e-4, atol=1e-6)
  gram = a.T @ a
  np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-5)


def _served_weights(run, state):
  """The library's served model (`FederatedRound.serve`): W + s·A(R)B per adapted map."""
  trainable, frozen = (state.trainable, run.frozen) if run.fl_round.serve is None else (
      run.fl_round.serve(state, run.frozen))
  params = {**_flat(frozen), **_flat(trainable)}
  return {site: params[_kernel(site)].reshape(DIM, -1) + SCALE * _product(params, site)
          for site in SITES}


def _library_start(run, state, client):
  algorithm = run.algorithm
  if algorithm.start is None:
    return _flat(state.trainable)
  shared = algorithm.round_input(state.algorithm_state)
  return _flat(algorithm.start(state.trainable,
                               algorithm.client_input(state.algorithm_state, shared, client)))


@pytest.mark.parametrize('rule', lora_rules.LORA_RULES.names())
def test_every_rule_is_its_papers_aggregation_written_out(rule):
  run = _run(rule)
  ref = Reference(rule, run)
  for r in range(2):
    keys = types.round_keys(run.states[0].rng, r)
    m = run.metrics[r]
    clients = [int(c) for c, rep in zip(m.clients, m.reported) if rep and c >= 0]
    assert len(clients) < int(m.num_sampled), 'a sampled client drops out'
    finals = {c: _train(run, ref.start(c), ref.kernels(), c, keys) for c in clients}
    p = {c: SIZES[c] / sum(SIZES[c] for c in clients) for c in clients}
    state = run.states[r + 1]
    served = ref.step(r, finals, p, _flat(state.trainable))
    library = _flat(state.trainable)
    for key, value in ref.trainable.items():
      np.testing.assert_allclose(library[key], value, rtol=1e-4, atol=2e-6, err_msg=str(key))
    for site, weight in _served_weights(run, state).items():
      np.testing.assert_allclose(weight, served[site], rtol=1e-4, atol=2e-6, err_msg=site)
    for c in range(len(SIZES)):  # Every client's start in the next round.
      expected, got = ref.start(c), _library_start(run, state, c)
      for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=2e-6,
                                   err_msg=f'client {c} {key}')
    error = float(m.algorithm[base.ERROR_KEY])
    np.testing.assert_allclose(error, ref.error(served), rtol=1e-3, atol=1e-5)
    if rule in EXACT:
      assert error < 1e-5, error
    else:
      assert error > 1e-3, error
