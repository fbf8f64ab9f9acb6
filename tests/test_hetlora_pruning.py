"""HetLoRA's local rank self-pruning (`peft.lora_prune_strength`, `lora_rules/hetlora.py`)
against numpy, on the six clients of ranks 1/2/4 of `test_lora_rules.py`: three rounds in
which some clients prune and others do not, one prunes at a rank it pruned to before.

The reference trains each client with the library's local SGD (as `test_lora_rules.py`
does) plus the penalty's gradient computed here in numpy (float64, from the dense tail
product M = A[:, k:r] B[k:r], through a callback at every step), takes the pruning
decision here from the dense tail norms, and aggregates with HetLoRA's sparsity weights.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import lora_rules
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated import types
from fedpeft_jax.federated.lora_rules import base
from fedpeft_jax.federated.lora_rules import hetlora
from tests import test_lora_rules as rules
from tests.conftest import tiny_config

# Chosen so that rounds 2 and 3 hold both decisions (round 1 cannot prune: B starts at 0).
# decay 0.5: rank 4 prunes to 2 (a tail of two ranks), 2 to 1; rank 1 cannot prune.
STRENGTH, DECAY, ROUNDS = 0.2, 0.5, 3
RANK, SITES, HETERO = rules.RANK, rules.SITES, rules.HETERO
_a, _b, _flat = rules._a, rules._b, rules._flat


def _kept(rank):
  return max(1, int(np.floor(DECAY * rank)))


def _layout_and_data():
  dataset, parts, trainable, frozen = rules._problem('hetlora')
  return dataset, parts, trainable, frozen, base.layout(trainable, frozen, rules.SCALE,
                                                        HETERO)


def _round(algorithm, parts, table):
  return round_lib.make_round(
      rules.loss_fn, rules.OPTIMIZER,
      client_lib.LocalSpec(max_examples=table.max_examples, **rules.LOCAL),
      round_lib.Cohort(5, len(parts), dropout_prob=0.25), algorithm=algorithm,
      execution=round_lib.Execution('padded', 3))


@functools.cache
def _pruning_run():
  dataset, parts, trainable, frozen, lay = _layout_and_data()
  table = types.ClientTable.from_partition(parts)
  spec = hetlora.self_pruning(lora_rules.LORA_RULES.get('hetlora'), STRENGTH, DECAY, lay)
  algorithm = base.algorithm(lay, spec.rule)
  fl_round = _round(algorithm, parts, table)
  apply = jax.jit(fl_round.apply)
  states, metrics = [fl_round.init(trainable, jax.random.key(3))], []
  for _ in range(ROUNDS):
    state, m = apply(states[-1], frozen, dataset, table)
    states.append(state)
    metrics.append(m)
  return rules.Run(dataset, table, frozen, algorithm, fl_round, apply, states,
                   metrics), spec, lay


def _numpy_penalty_gradient(rank, *factors):
  """STRENGTH x the gradient of Σ_maps ‖A[:, k:r] B[k:r]‖_F (k = max(1, ⌊γr⌋)) at the
  factors (A of each site, then B of each): ∂/∂A_t = M B_tᵀ/‖M‖, ∂/∂B_t = A_tᵀ M/‖M‖."""
  rank = int(rank)
  k = _kept(rank)
  a_s, b_s = factors[:len(SITES)], factors[len(SITES):]
  grads_a, grads_b = [], []
  for a, b in zip(a_s, b_s):
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(RANK, -1)
    m = a64[:, k:rank] @ b64[k:rank]
    norm = np.linalg.norm(m)
    grad_a, grad_b = np.zeros_like(a64), np.zeros_like(b64)
    if norm > 0:
      grad_a[:, k:rank] = STRENGTH * m @ b64[k:rank].T / norm
      grad_b[k:rank] = STRENGTH * a64[:, k:rank].T @ m / norm
    grads_a.append(grad_a.astype(np.float32))
    grads_b.append(grad_b.reshape(np.shape(b)).astype(np.float32))
  return tuple(grads_a + grads_b)


@functools.cache
def _penalised_update():
  """The library's local SGD with the numpy penalty gradient added at every step (the
  client input is the client's rank)."""
  paths = [_a(s) for s in SITES] + [_b(s) for s in SITES]

  def gradient(grads, params, global_params, rank):
    flat = traverse_util.flatten_dict(params)
    shapes = tuple(jax.ShapeDtypeStruct(flat[p].shape, jnp.float32) for p in paths)
    extra = jax.pure_callback(_numpy_penalty_gradient, shapes, rank,
                              *[flat[p] for p in paths])
    flat_grads = traverse_util.flatten_dict(grads)
    for path, g in zip(paths, extra):
      flat_grads[path] = flat_grads[path] + g
    return traverse_util.unflatten_dict(flat_grads)

  return jax.jit(client_lib.make_client_update(
      rules.loss_fn, rules.OPTIMIZER, max_examples=max(rules.SIZES), gradient=gradient,
      **rules.LOCAL))


def _train(run, start, frozen, client, keys, rank):
  unflat = lambda flat: traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  out = _penalised_update()(
      unflat(start), unflat(frozen), run.dataset,
      run.table.example_ids[client][:max(rules.SIZES)], run.table.num_examples[client],
      jax.random.fold_in(keys.clients, client), jnp.int32(rank))
  return {k: start[k] + v for k, v in _flat(out.delta).items()}


def _tail_norm(params, rank):
  """Σ_maps ‖A[:, k:r] B[k:r]‖_F from the dense tail products, float64."""
  k = _kept(rank)
  return sum(np.linalg.norm(params[_a(s)][:, k:rank] @
                            params[_b(s)].reshape(RANK, -1)[k:rank]) for s in SITES)


@functools.cache
def _reference():
  """Per round: (clients, ranks at the start, ranks after, pruned clients, global flat
  trainable after, aggregation error), by the module docstring's recipe."""
  run, _, _ = _pruning_run()
  frozen = _flat(run.frozen)
  trainable, ranks = _flat(run.states[0].trainable), HETERO.copy()
  rounds = []
  for r in range(ROUNDS):
    keys = types.round_keys(run.states[0].rng, r)
    m = run.metrics[r]
    clients = [int(c) for c, rep in zip(m.clients, m.reported) if rep and c >= 0]
    start_ranks, finals, pruned = ranks.copy(), {}, []
    for c in clients:
      start = rules._cut(trainable, ranks[c])
      final = _train(run, start, frozen, c, keys, ranks[c])
      before, after = _tail_norm(start, ranks[c]), _tail_norm(final, ranks[c])
      # A clear decision, not a float tie that float32 could flip.
      assert after == before == 0 or abs(after - before) > 1e-3 * before, (c, before, after)
      if after < before:
        ranks[c] = _kept(ranks[c])
        final = rules._cut(final, ranks[c])
        pruned.append(c)
      finals[c] = final
    p = {c: rules.SIZES[c] / sum(rules.SIZES[c] for c in clients) for c in clients}
    new = {k: sum(p[c] * finals[c][k] for c in clients) for k in trainable}
    products = {c: {s: rules._product(finals[c], s) for s in SITES} for c in clients}
    errors = []
    for s in SITES:  # HetLoRA's sparsity-weighted zero-padded average of the sent factors.
      norms = {c: np.linalg.norm(products[c][s]) for c in clients}
      for path in (_a(s), _b(s)):
        new[path] = sum(norms[c] * finals[c][path] for c in clients) / sum(norms.values())
      ideal = sum(p[c] * products[c][s] for c in clients)
      errors.append(np.linalg.norm(ideal - rules._product(new, s)) / np.linalg.norm(ideal))
    trainable = new
    rounds.append((clients, start_ranks, ranks.copy(), pruned, new, np.mean(errors)))
  return rounds


def test_self_pruning_is_the_penalty_and_the_decision_written_out_in_numpy():
  run, _, _ = _pruning_run()
  reference = _reference()
  for r, (clients, start_ranks, ranks, pruned, expected, error) in enumerate(reference):
    state, m = run.states[r + 1], run.metrics[r]
    np.testing.assert_array_equal(state.algorithm_state.ranks, ranks, err_msg=f'round {r + 1}')
    np.testing.assert_array_equal(state.algorithm_state.start, start_ranks)
    assert float(m.algorithm[base.RANK_KEY]) == pytest.approx(ranks.mean(), abs=1e-6)
    np.testing.assert_allclose(float(m.algorithm[base.ERROR_KEY]), error, rtol=1e-3)
    library = _flat(state.trainable)
    for key, value in expected.items():  # The served (global) factors and head.
      np.testing.assert_allclose(library[key], value, rtol=1e-4, atol=2e-6,
                                 err_msg=f'round {r + 1} {key}')
    for c in range(len(rules.SIZES)):  # Every client's start next round, at its rank.
      got = rules._library_start(run.algorithm, state, c)
      for key, value in rules._cut(expected, ranks[c]).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=2e-6,
                                   err_msg=f'round {r + 1} client {c} {key}')
  assert not reference[0][3], 'round 1 prunes nobody: every tail starts at B = 0'
  # What makes the claim testable: both decisions, and a client pruning twice.
  for r in (1, 2):
    clients, start_ranks, _, pruned, _, _ = reference[r]
    kept_at_rank = [c for c in clients if c not in pruned and start_ranks[c] > 1]
    assert pruned and kept_at_rank, (r + 1, pruned, kept_at_rank)
  assert set(reference[1][3]) & set(reference[2][3]), 'a client prunes again'
  assert run.apply._cache_size() == 1  # One compiled round as the ranks shrink.


def test_a_pruning_client_sends_its_new_ranks_bytes_and_the_record_has_the_mean_rank():
  """Down at the rank a client starts the round with, up at its rank after pruning (four
  bytes a float: per rank, A's 6 and B's 4 numbers on each of the two maps; the head's
  20 each way); metrics.jsonl's record carries 'lora_mean_rank'."""
  run, spec, lay = _pruning_run()
  head = 4 * rules.CLASSES + rules.CLASSES
  other = head  # The trainable numbers besides the factors.
  traffic = callbacks.Traffic(0, 1, lora_rules.client_bytes(spec, lay, other, len(HETERO)))
  summary = callbacks.RoundSummary(0)
  for r, (_, start_ranks, ranks, _, _, _) in enumerate(_reference()):
    state, m = run.states[r + 1], run.metrics[r]
    clients = np.asarray(m.clients)
    sampled, reported = clients[clients >= 0], clients[np.asarray(m.reported)]
    record = traffic.on_round_end(r + 1, state, m, {})
    assert record['bytes_down'] == sum(4 * (head + 20 * start_ranks[c]) for c in sampled)
    assert record['bytes_up'] == sum(4 * (head + 20 * ranks[c]) for c in reported)
    assert summary.on_round_end(r + 1, state, m, {})['lora_mean_rank'] == pytest.approx(
        ranks.mean())
  assert any((_reference()[r][1] != _reference()[r][2]).any() for r in range(ROUNDS))


def test_self_pruning_resumes_bit_identical(tmp_path):
  """Checkpointed after round 2 (some ranks pruned) and restored into a fresh state, round
  3 is the uninterrupted run's bit for bit: the model and every client's rank."""
  run, _, _ = _pruning_run()
  assert (np.asarray(run.states[2].algorithm_state.ranks) != HETERO).any()
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(run.states[2], {}, tiny_config('lora'))
  restored = checkpointer.restore_state(2, run.states[0])
  state, _ = run.apply(restored, run.frozen, run.dataset, run.table)
  jax.tree.map(np.testing.assert_array_equal, (state.trainable, state.algorithm_state),
               (run.states[3].trainable, run.states[3].algorithm_state))


def test_zero_strength_is_todays_hetlora_bit_for_bit():
  """The config's default (peft.lora_prune_strength=0) builds the registered rule: no
  state, the same two rounds as `test_lora_rules.py`'s HetLoRA bit for bit; a positive
  strength builds the pruning one (every client's rank in its state)."""
  dataset, parts, trainable, frozen, lay = _layout_and_data()
  table = types.ClientTable.from_partition(parts)
  config = tiny_config('lora')
  config.peft.lora_aggregation = 'hetlora'
  fl_round = _round(build.build_federated_algorithm(config, lay), parts, table)
  state = fl_round.init(trainable, jax.random.key(3))
  assert state.algorithm_state == ()
  today = rules._run('hetlora')
  apply = jax.jit(fl_round.apply)
  for expected in today.states[1:]:
    state, _ = apply(state, frozen, dataset, table)
    jax.tree.map(np.testing.assert_array_equal, state.trainable, expected.trainable)
  config.peft.lora_prune_strength = STRENGTH
  pruning = build.build_federated_algorithm(config, lay).init(trainable, len(HETERO))
  np.testing.assert_array_equal(pruning.ranks, HETERO)


@pytest.mark.parametrize('changes, key, message', [
    ({'peft.lora_prune_strength': 0.1}, 'peft.lora_prune_strength',
     "needs peft.lora_aggregation='hetlora'"),
    ({'peft.lora_aggregation': 'flexlora', 'peft.lora_prune_strength': 0.1},
     'peft.lora_prune_strength', "needs peft.lora_aggregation='hetlora'"),
    ({'peft.lora_aggregation': 'hetlora', 'peft.lora_prune_strength': -0.1},
     'peft.lora_prune_strength', 'must be >= 0'),
    ({'peft.lora_aggregation': 'hetlora', 'peft.lora_prune_strength': 0.1,
      'peft.lora_prune_decay': 1.0}, 'peft.lora_prune_decay', 'must be in (0, 1)'),
    ({'peft.lora_aggregation': 'hetlora', 'peft.lora_prune_decay': 0.0},
     'peft.lora_prune_decay', 'must be in (0, 1)'),
    ({'peft.lora_aggregation': 'hetlora', 'peft.lora_prune_strength': 0.1,
      'dp.mode': 'client', 'dp.sampling': 'fixed'}, 'peft.lora_aggregation',
     "refused under dp.mode='client'"),
])
def test_what_self_pruning_cannot_run_with_is_refused_in_one_line(changes, key, message):
  config = tiny_config('lora')
  for name, value in changes.items():
    section, option = name.split('.')
    setattr(config[section], option, value)
  with pytest.raises(validation.ConfigError, match=re.escape(message)) as raised:
    validation.validate(config)
  assert str(raised.value).startswith(f'--config.{key}=') and '\n' not in str(raised.value)
  config.peft.lora_aggregation, config.dp.mode = 'hetlora', 'none'
  config.peft.lora_prune_strength, config.peft.lora_prune_decay = 0.1, 0.9
  validation.validate(config)  # The fix.
