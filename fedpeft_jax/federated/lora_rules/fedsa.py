"""FedSA-LoRA (Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): A learns what clients share and is averaged; B learns what is client-specific
and stays with its client across rounds. The server keeps every client's B ([num_clients,
rank, out...] per adapted map, like SCAFFOLD's variates: each starts at the initial B;
dropped and NaN clients keep theirs), a client starts from the global A and its own B.

The global model (evaluated, and the aggregation error's served update) has the averaged A
and the weighted mean of this round's aggregated clients' B (Σp_i B_i); a round without
any keeps the last. Traffic: A (and the other trainable parameters) each way; B never
travels. The per-client B table is in the checkpoint (resumed bit-identical). Under client
DP the served mean of the B_i is a per-client release without noise: refused; its B needs
the plain FedAvg step.
"""
import jax.numpy as jnp

from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import base


def init(lay, trainable, num_clients):
  """Every client's B, at the initial B."""
  return tuple(jnp.broadcast_to(base.get(trainable, site.b),
                                (num_clients,) + lay.shapes[site.b]) for site in lay.sites)


def client_part(lay, state, client):
  return tuple(table[client] for table in state)


def start(lay, trainable, own_b):
  return base.replace(trainable, {site.b: b.astype(base.get(trainable, site.b).dtype)
                                  for site, b in zip(lay.sites, own_b)})


def update(lay, state, done):
  """B_i += its update, at the used clients' rows (an add: padding lanes add zero)."""
  return tuple(table.at[done.ids].add(done.used(base.get(done.delta, site.b)))
               for site, table in zip(lay.sites, state))


def add_begin(lay):
  return tuple(jnp.zeros(lay.shapes[site.b], jnp.float32) for site in lay.sites)


def add(lay, extra, lanes):
  return tuple(total + jnp.einsum('l,l...->...', lanes.weight,
                                  base.get(lanes.final, site.b).astype(jnp.float32))
               for site, total in zip(lay.sites, extra))


def server(lay, sums, mean_delta, end):
  targets = {}
  for site, total in zip(lay.sites, sums.extra):
    old = base.get(end.trainable, site.b)
    targets[site.b] = jnp.where(sums.weight > 0, total / jnp.maximum(sums.weight, 1e-30),
                                old).astype(old.dtype)
  return base.set_factors(lay, mean_delta, end.trainable, targets), sums.state, None


def traffic(lay, rank, round_index):
  floats = base.factor_floats(lay, rank, kinds=('a', 'r'))
  return floats, floats


LORA_RULES.register('fedsa', base.LoraRuleSpec(
    base.Rule(server=server, init=init, client_part=client_part, start=start,
              add_begin=add_begin, add=add, update=update),
    plain_server_step=True, traffic=traffic,
    client_dp='the served mean of the clients\' own B_i is a per-client release without '
              'noise',
    summary='A averaged, each client\'s B kept on its client across rounds; the global '
            'model has the mean B'))
