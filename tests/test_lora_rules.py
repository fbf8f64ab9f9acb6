"""The federated LoRA rules (`peft.lora_aggregation`, issue 22), each against its paper's
formulas written out in numpy here: two rounds of six clients of unequal sizes (one
dropped each round), the clients trained by the library's local SGD from the starts the
reference computes, then the reference's aggregation compared with the round's: the served
model's adapted weights, every client's starting factors for the next round, and the
aggregation error (0 for the exact rules, positive for FedIT).

Notation as in `lora_rules/base.py`: a map's update is s·A @ (R @) B (x @ W layout).
"""
import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedpeft_jax import peft
from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import train
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
REFERENCES = ('fedit', 'ffa', 'fedsb', 'fedex', 'flora', 'flexlora', 'hetlora', 'fedsa')
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


def _problem(rule, rank=RANK):
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
                      'lora_query_a': normal(DIM, rank) * 0.5,
                      'lora_query_b': b_matrix((rank, 4))},
            'block': {'value': {'kernel': normal(DIM, 2, 2) * 0.3},
                      'lora_value_a': normal(DIM, rank) * 0.5,
                      'lora_value_b': b_matrix((rank, 2, 2))},
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


def _make(rule, schedule='padded', measure_error=True):
  dataset, parts, trainable, frozen = _problem(rule)
  table = types.ClientTable.from_partition(parts)
  algorithm = base.algorithm(base.layout(trainable, frozen, SCALE, RANKS.get(rule)),
                             lora_rules.LORA_RULES.get(rule).rule, measure_error)
  fl_round = round_lib.make_round(
      loss_fn, OPTIMIZER, client_lib.LocalSpec(max_examples=table.max_examples, **LOCAL),
      round_lib.Cohort(5, len(parts), dropout_prob=0.25), algorithm=algorithm,
      execution=round_lib.Execution(schedule, 3))
  return dataset, table, frozen, algorithm, fl_round, trainable


@functools.cache
def _run(rule, schedule='padded', measure_error=True) -> Run:
  dataset, table, frozen, algorithm, fl_round, trainable = _make(rule, schedule, measure_error)
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


def _library_start(algorithm, state, client):
  if algorithm.start is None:
    return _flat(state.trainable)
  shared = algorithm.round_input(state.algorithm_state)
  return _flat(algorithm.start(state.trainable,
                               algorithm.client_input(state.algorithm_state, shared, client)))


@pytest.mark.parametrize('rule', lora_rules.LORA_RULES.names())
def test_every_rule_is_its_papers_aggregation_written_out(rule):
  """The rules' contract: a registered rule has its paper's reference in `Reference.step`
  (a new rule adds its branch there), and is exact exactly when it declares so."""
  assert rule in REFERENCES, f'write {rule!r}\'s reference in Reference.step'
  assert lora_rules.LORA_RULES.get(rule).exact == (rule in EXACT)
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
      expected, got = ref.start(c), _library_start(run.algorithm, state, c)
      for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=2e-6,
                                   err_msg=f'client {c} {key}')
    error = float(m.algorithm[base.ERROR_KEY])
    np.testing.assert_allclose(error, ref.error(served), rtol=1e-3, atol=1e-5)
    if rule in EXACT:
      assert error < 1e-5, error
    else:
      assert error > 1e-3, error


@pytest.mark.parametrize('rule', lora_rules.LORA_RULES.names())
def test_a_rule_with_server_state_resumes_bit_identical(rule, tmp_path):
  """Checkpointed after round 1 and restored into a fresh state, round 2 is the
  uninterrupted run's bit for bit: the model and the rule's state (merged updates, W_g,
  every client's B)."""
  run = _run(rule)
  stateful = bool(jax.tree.leaves(run.states[1].algorithm_state))
  assert stateful == (rule in ('fedex', 'flora', 'flexlora', 'fedsa'))
  if not stateful:
    pytest.skip(f'{rule} keeps no server state')
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(run.states[1], {}, tiny_config('lora'))
  restored = checkpointer.restore_state(1, run.states[0])
  state, _ = run.apply(restored, run.frozen, run.dataset, run.table)
  expected = run.states[2]
  jax.tree.map(np.testing.assert_array_equal, (state.trainable, state.algorithm_state),
               (expected.trainable, expected.algorithm_state))


@pytest.mark.parametrize('rule', ['fedit', 'flexlora'])
def test_without_the_aggregation_error_a_rule_trains_the_same_and_keeps_no_dense_sum(rule):
  """`peft.lora_aggregation_error=False`: the same two rounds bit for bit, no error in the
  round's metrics, and FedIT (whose server step needs no products) sums no dense
  [in, out] per map; FlexLoRA still sums them, its server step averages the products."""
  measured, unmeasured = _run(rule), _run(rule, measure_error=False)
  for a, b in zip(measured.states[1:], unmeasured.states[1:]):
    jax.tree.map(np.testing.assert_array_equal, (a.trainable, a.algorithm_state),
                 (b.trainable, b.algorithm_state))
  assert base.ERROR_KEY in measured.metrics[0].algorithm
  assert all(base.ERROR_KEY not in m.algorithm for m in unmeasured.metrics)
  sums = unmeasured.algorithm.begin(unmeasured.states[1].algorithm_state)
  dims = [(DIM, 4), (DIM, 4)]  # 'value' [6, 2, 2] and 'query' [6, 4]: in x out each.
  assert [tuple(p.shape) for p in sums.products] == ([] if rule == 'fedit' else dims)
  config = tiny_config('lora')
  config.peft.lora_aggregation_error = False
  validation.validate(config)


def test_the_packed_schedule_starts_clients_where_the_padded_one_does():
  """Per-client starts (HetLoRA's mixed ranks; FedSA-LoRA's own B takes the same path) in
  packed lanes that change clients mid-round: the same two rounds as the padded chunks."""
  packed, padded = _run('hetlora', 'packed'), _run('hetlora')
  for a, b in zip(packed.states[1:], padded.states[1:]):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 (a.trainable, a.algorithm_state), (b.trainable, b.algorithm_state))


def test_clients_of_ranks_2_4_8_16_share_one_compiled_round_and_send_their_ranks_bytes():
  ranks = lora_rules.client_ranks('2,4,8,16', 16, len(SIZES), seed=1)
  assert set(ranks.tolist()) == {2, 4, 8, 16}, ranks
  dataset, parts, trainable, frozen = _problem('fedit', rank=16)
  table = types.ClientTable.from_partition(parts)
  lay = base.layout(trainable, frozen, SCALE, ranks)
  spec = lora_rules.LORA_RULES.get('fedit')
  algorithm = base.algorithm(lay, spec.rule)
  fl_round = round_lib.make_round(
      loss_fn, OPTIMIZER, client_lib.LocalSpec(max_examples=table.max_examples, **LOCAL),
      round_lib.Cohort(4, len(parts), dropout_prob=0.25), algorithm=algorithm,
      execution=round_lib.Execution('padded', 3))
  apply = jax.jit(fl_round.apply)
  state = fl_round.init(trainable, jax.random.key(0))
  head = 4 * CLASSES + CLASSES
  traffic = callbacks.Traffic(peft.count(trainable), 1, lora_rules.client_bytes(
      spec, lay, peft.count(trainable) - 16 * 2 * (DIM + 4), len(parts)))
  for round_index in (1, 2, 3):
    state, m = apply(state, frozen, dataset, table)
    clients = np.asarray(m.clients)
    record = traffic.on_round_end(round_index, state, m, {})
    # A client of rank r sends and receives r (in + out) per map (two maps of 6 x 4) and
    # the head, as float32.
    own = lambda c: 4 * (head + ranks[c] * 2 * (DIM + 4))
    assert record['bytes_down'] == sum(own(c) for c in clients[clients >= 0])
    assert record['bytes_up'] == sum(own(c) for c in clients[np.asarray(m.reported)])
    for c in range(len(parts)):  # Each client trains its first r columns of A, rows of B.
      start = _library_start(algorithm, state, c)
      for site in SITES:
        assert not start[_a(site)][:, ranks[c]:].any() and not start[_b(site)][ranks[c]:].any()
        assert start[_b(site)][:ranks[c]].any()
  assert apply._cache_size() == 1


def test_ranks_are_drawn_once_per_run_from_the_seed_and_refused_one_line_when_bad():
  a = lora_rules.client_ranks('uniform', 16, 400, seed=3)
  np.testing.assert_array_equal(a, lora_rules.client_ranks('uniform', 16, 400, seed=3))
  assert set(a.tolist()) == {1, 2, 4, 8, 16}
  heavy = lora_rules.client_ranks('heavy_tail', 16, 400, seed=3)
  normal = lora_rules.client_ranks('normal', 16, 400, seed=3)
  assert np.mean(heavy == 1) > np.mean(heavy == 16) * 2  # Mostly small, a tail of large.
  assert np.mean(normal == 4) > np.mean(normal == 16) * 2  # Mostly in the middle.
  assert lora_rules.client_ranks('', 16, 4, seed=0) is None
  for bad in ('3,x', '0,4', '32', 'zipf'):
    with pytest.raises(Exception, match='comma list of ranks in 1..16'):
      lora_rules.client_ranks(bad, 16, 4, seed=0)


@pytest.mark.parametrize('changes, key, message', [
    ({'peft.lora_aggregation': 'fedx'}, 'peft.lora_aggregation', 'must be one of fedex'),
    ({'peft.lora_aggregation': 'fedex', 'fl.algorithm': 'scaffold'}, 'fl.algorithm',
     "runs on FedAvg's round"),
    ({'peft.lora_client_ranks': '2,4', 'fl.algorithm': 'fednova'}, 'fl.algorithm',
     "runs on FedAvg's round"),
    ({'peft.lora_aggregation': 'flora', 'fl.server_optimizer': 'adam'},
     'fl.server_optimizer', 'plain FedAvg step'),
    ({'peft.lora_aggregation': 'flexlora', 'dp.mode': 'client', 'dp.sampling': 'fixed'},
     'peft.lora_aggregation', "refused under dp.mode='client'"),
    ({'peft.lora_aggregation': 'fedex', 'peft.lora_freeze_a': True}, 'peft.lora_freeze_a',
     'FFA-LoRA'),
    ({'peft.lora_client_ranks': '2,64'}, 'peft.lora_client_ranks', 'ranks in 1..8'),
    ({'peft.method': 'bias', 'peft.lora_aggregation': 'fedsa'}, 'peft.lora_aggregation',
     "needs 'lora' in peft.method"),
])
def test_what_a_rule_cannot_run_with_is_refused_in_one_line_naming_the_key(changes, key,
                                                                            message):
  config = tiny_config('lora')
  for name, value in changes.items():
    section, option = name.split('.')
    setattr(config[section], option, value)
  with pytest.raises(validation.ConfigError, match=message) as raised:
    validation.validate(config)
  assert str(raised.value).startswith(f'--config.{key}=') and '\n' not in str(raised.value)


def test_the_allowed_combinations_validate():
  for changes in ({'peft.lora_aggregation': 'ffa', 'fl.algorithm': 'scaffold'},
                  {'peft.lora_aggregation': 'fedsb', 'dp.mode': 'client',
                   'dp.sampling': 'fixed'},
                  {'peft.lora_aggregation': 'fedit', 'fl.server_optimizer': 'adam'},
                  {'peft.lora_aggregation': 'hetlora', 'peft.lora_client_ranks': 'normal',
                   'fl.algorithm': 'fedprox', 'fl.prox_mu': 0.01}):
    config = tiny_config('lora')
    for name, value in changes.items():
      section, option = name.split('.')
      setattr(config[section], option, value)
    validation.validate(config)


def test_a_run_of_mixed_ranks_records_them_its_traffic_and_its_aggregation_error(tmp_path):
  """In-process run of the tiny ViT with FlexLoRA and ranks drawn from 2/4/8/16:
  partition.json has every client's rank, metrics.jsonl each round's aggregation error (0:
  the served model is the clients' average) and each client's own rank's bytes, counted
  here from the exported tree's shapes."""
  config = tiny_config('lora')
  config.peft.lora_aggregation, config.peft.lora_client_ranks = 'flexlora', '2,4,8,16'
  config.peft.lora_rank, config.fl.rounds = 16, 2
  validation.validate(config)
  history = train.train(config, str(tmp_path))
  ranks = json.loads((tmp_path / 'partition.json').read_text())['lora_client_ranks']
  np.testing.assert_array_equal(ranks, lora_rules.client_ranks(
      '2,4,8,16', 16, config.fl.num_clients, config.seed))
  with np.load(tmp_path / 'trainable.npz') as exported:
    shapes = {k: exported[k].shape for k in exported.files}
  per_rank = sum(s[0] if k.endswith('_a') else int(np.prod(s[1:]))
                 for k, s in shapes.items() if k.rsplit('/', 1)[-1].startswith('lora_'))
  other = sum(int(np.prod(s)) for s in shapes.values()) - 16 * per_rank
  for record in history[1:]:
    expected = sum(4 * (other + ranks[c] * per_rank) for c in record['clients'])
    assert record['bytes_up'] == record['bytes_down'] == expected
    assert 0 <= record['lora_aggregation_error'] < 1e-5
    assert 'test_accuracy' in record


def test_under_dp_the_aggregation_error_is_a_diagnostic_and_evaluation_sees_the_served_model():
  """The error is computed from the clients' products without noise: outside what epsilon
  covers. Evaluation scores the model the rule serves (a merging rule's backbone)."""
  record = {'round': 1, 'train_loss': 0.5, 'lora_aggregation_error': 0.1, 'epsilon': 1.0,
            'round_s': 1.0}
  moved = callbacks.SeparateDiagnostics().on_round_end(1, None, None, record)
  assert 'lora_aggregation_error' not in moved
  assert moved['diagnostics']['lora_aggregation_error'] == 0.1
  seen = []
  evaluation = callbacks.Evaluation(lambda t, f=None: seen.append((t, f)) or {}, 1, 1,
                                    served=lambda state: ('served', 'merged'))
  evaluation.on_round_zero(None, {})
  evaluation.on_round_end(1, None, None, {})
  assert seen == [('served', 'merged')] * 2


def test_ffa_is_lora_freeze_a_and_fedsb_trains_only_a_middle_matrix_zero_at_first():
  """On the tiny ViT: 'ffa' freezes what lora_freeze_a does; Fed-SB's model adds R
  (trained, zero: the pretrained function) between a fixed A and a B of orthonormal rows,
  and any R changes the function (A @ R @ B is not degenerate)."""
  from fedpeft_jax.experiment import build
  config = tiny_config('lora')
  config.peft.lora_aggregation = 'fedsb'
  model, family = build.build_model(config), build.model_family(config)
  inputs = family.dummy_input(config)
  params = jax.jit(model.init)(jax.random.key(0), *inputs)['params']
  trainable, frozen = peft.split(params, peft.labels('lora', params,
                                                    **build.peft_options(config)))
  lora_trained = [p for p in peft.paths(trainable) if '/lora_' in p]
  assert lora_trained and all(p.endswith('_r') for p in lora_trained)
  for site in base.layout(trainable, frozen, 1.0).sites:
    b = np.asarray(base.get(frozen, site.b)).reshape(config.peft.lora_rank, -1)
    np.testing.assert_allclose(b @ b.T, np.eye(len(b)), atol=1e-5)
    assert not np.asarray(base.get(trainable, site.r)).any()
  logits = lambda t: model.apply({'params': peft.merge(t, frozen)}, *inputs)
  flat = traverse_util.flatten_dict(trainable)  # A head that reads the features (not 0):
  flat[('head', 'kernel')] = jnp.ones_like(flat[('head', 'kernel')]).at[0].set(-1.0)
  trainable = traverse_util.unflatten_dict(flat)
  moved = traverse_util.unflatten_dict({  # R alone moves.
      k: v + 0.1 if k[-1].startswith('lora_') else v for k, v in flat.items()})
  assert not np.allclose(logits(trainable), logits(moved))
  lora_params = jax.jit(build.build_model(tiny_config('lora')).init)(
      jax.random.key(0), *inputs)['params']
  assert (peft.labels('lora', lora_params, lora_aggregation='ffa') ==
          peft.labels('lora', lora_params, lora_freeze_a=True))


@pytest.mark.parametrize('rule', lora_rules.LORA_RULES.names())
def test_every_rule_runs_under_client_dp_exactly_when_it_declares_so(rule):
  config = tiny_config('lora,dp=client')
  config.peft.lora_aggregation = rule
  if lora_rules.LORA_RULES.get(rule).client_dp is None:
    validation.validate(config)
  else:
    with pytest.raises(validation.ConfigError, match=r"^--config.peft.lora_aggregation=.*"
                       r"refused under dp.mode='client'"):
      validation.validate(config)
