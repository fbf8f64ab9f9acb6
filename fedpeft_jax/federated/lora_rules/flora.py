"""FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations"): the server stacks the clients' factors, [p_1 A_1 ...
p_n A_n] @ [B_1; ...; B_n] = Σp_i A_i B_i, merges that product into the frozen weights,
and every client starts the next round from fresh factors: A re-initialised (He-uniform,
from a key folded from the run's key and the round), B zero. Stacking takes clients of any
rank as they are. Exact: the served model is W + s·Σp_i A_i B_i (the fresh factors add
nothing while B is zero).

The merged products, summed over rounds, are the server's state (float32 [in, out] per
adapted map: checkpointed, resumed bit-identical); clients and evaluation see the kernels
plus s times it. Traffic: a client's upload is its factors; its download, from round 2
on, the adapted maps' merged update, dense (in x out per map: a client sampled now may
have missed earlier merges, so stacked factors would not do); its fresh factors come from
the seed and do not travel. Refused under client DP (stacking releases every client's
factors); the reset factors need the plain FedAvg step.
"""
import jax
import jax.numpy as jnp

from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import base
from fedpeft_jax.peft import lora

KEY_TAG = 0xF10A  # Folded into the run's key first: FLoRA's own stream.


def fresh_a(rng, round_index, site_index: int, shape, dtype):
  """The A every client starts round `round_index` (1-based) from: He-uniform with key
  fold_in(fold_in(fold_in(rng, KEY_TAG), round_index), site_index). Round 1 starts from
  the model's own initialisation."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, KEY_TAG),
                                              round_index), site_index)
  return lora.init_a(key, shape, dtype)


def init(lay, trainable, num_clients):
  return tuple(jnp.zeros(lay.dims(site), jnp.float32) for site in lay.sites)


def server(lay, sums, mean_delta, end):
  merged = tuple(jnp.where(sums.weight > 0, ideal, 0) for ideal in base.ideal(sums))
  targets = {}
  for index, site in enumerate(lay.sites):
    a = base.get(end.trainable, site.a)
    targets[site.a] = fresh_a(end.rng, end.round + 2, index, a.shape, a.dtype)
    targets[site.b] = jnp.zeros_like(base.get(end.trainable, site.b))
  mean_delta = base.set_factors(lay, mean_delta, end.trainable, targets)
  return mean_delta, tuple(d + m for d, m in zip(sums.state, merged)), merged


def traffic(lay, rank, round_index):
  return (base.dense_floats(lay) if round_index > 1 else 0), base.factor_floats(lay, rank)


LORA_RULES.register('flora', base.LoraRuleSpec(
    base.Rule(server=server, init=init, uses_products=True,
              frozen=lambda lay, state, frozen: base.fold_all(lay, frozen, state)),
    exact=True, plain_server_step=True, folds=True, traffic=traffic,
    client_dp='stacking releases every client\'s own factors, not a noised sum',
    summary='the clients\' factors stacked, their product merged into the frozen weights, '
            'fresh factors every round: exact; the merge travels down, dense'))
