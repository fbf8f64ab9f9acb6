"""FedEx-LoRA (Singhal et al. 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models"): A and B averaged apart as FedIT, and the
residual Σp_i A_i B_i − Ā·B̄ folded into the frozen weight, W ← W + s·(Σp_i A_i B_i −
Ā·B̄): the served model W + s·Ā·B̄ is then exactly the average of the clients' models.

The residuals, summed over rounds, are the server's state (one float32 [in, out] per
adapted map: checkpointed, resumed bit-identical); clients and evaluation see the
kernels plus s times it (`Rule.frozen`). A client sampled from round 2 on receives the
adapted maps' merged residual, dense (in x out per map), besides the factors; its upload
is its factors. The residual needs each client's product, more than a noised sum: refused
under client DP. It sets nothing but the residual, but its exactness needs the plain
FedAvg step (the residual is of Ā·B̄, the step's landing point).
"""
import jax
import jax.numpy as jnp

from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import base


def init(lay, trainable, num_clients):
  """The merged residual of every site, zero: float32 [in, out] each."""
  return tuple(jnp.zeros(lay.dims(site), jnp.float32) for site in lay.sites)


def server(lay, sums, mean_delta, end):
  served = base.products(lay, jax.tree.map(jnp.add, end.trainable, mean_delta), end.frozen)
  residual = tuple(jnp.where(sums.weight > 0, ideal - p, 0)
                   for ideal, p in zip(base.ideal(sums), served))
  return mean_delta, tuple(d + r for d, r in zip(sums.state, residual)), residual


def traffic(lay, rank, round_index):
  factors = base.factor_floats(lay, rank)
  return factors + (base.dense_floats(lay) if round_index > 1 else 0), factors


LORA_RULES.register('fedex', base.LoraRuleSpec(
    base.Rule(server=server, init=init, uses_products=True,
              frozen=lambda lay, state, frozen: base.fold_all(lay, frozen, state)),
    exact=True, plain_server_step=True, folds=True, traffic=traffic,
    client_dp='the residual Σp_i·A_i·B_i − Ā·B̄ needs every client\'s product, not only '
              'the noised sum of their updates',
    summary='FedIT plus the residual Σp_i·A_i·B_i − Ā·B̄ folded into the frozen weights: '
            'exact; the residual travels down, dense'))
