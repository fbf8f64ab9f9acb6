"""FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): the server averages the clients' full products,
W_g = Σp_i A_i B_i, and each client starts the next round from W_g's truncated SVD at its
own rank: with W_g = U S V^T, A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T (this project's
x @ A @ B layout), so A @ B is the best rank-r approximation of W_g.

The global model is W + s·W_g, full: the served update is the clients' average (error 0);
its factors at the largest rank are the global trainable tree and W_g − A @ B is added to
the kernels for evaluation (`Rule.served`), not for the clients, who train W + s·A_r B_r as
the paper's do. W_g (float32 [in, out] per adapted map) is the server's state:
checkpointed, resumed bit-identical. In round 1 the clients start from LoRA's
initialisation (W_g = A_0 B_0 = 0 has no factors). Traffic: the client's factors, at its
rank, each way. Refused under client DP (the products and their SVD are not a noised sum);
its factors need the plain FedAvg step.
"""
import jax
import jax.numpy as jnp

from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import base


def truncated_factors(dense, rank: int, a_shape, b_shape):
  """(A [in, rank], B [rank, out...]) of the rank-`rank` truncated SVD of `dense`
  [in, out]: U_r sqrt(S_r) and sqrt(S_r) V_r^T, zero-padded past min(in, out)."""
  u, s, vt = jnp.linalg.svd(dense, full_matrices=False)
  k = min(rank, s.shape[0])
  root = jnp.sqrt(s[:k])
  a = jnp.pad(u[:, :k] * root, ((0, 0), (0, rank - k)))
  b = jnp.pad(root[:, None] * vt[:k], ((0, rank - k), (0, 0)))
  return a.reshape(a_shape), b.reshape(b_shape)


def init(lay, trainable, num_clients):
  """W_g of the initial factors (A_0 B_0)."""
  return base.products(lay, trainable, {})


def server(lay, sums, mean_delta, end):
  w_g = tuple(jnp.where(sums.weight > 0, ideal, old)
              for ideal, old in zip(base.ideal(sums), sums.state))
  targets = {}
  for site, dense in zip(lay.sites, w_g):
    a, b = base.get(end.trainable, site.a), base.get(end.trainable, site.b)
    new_a, new_b = truncated_factors(dense, lay.rank, a.shape, b.shape)
    targets[site.a], targets[site.b] = new_a.astype(a.dtype), new_b.astype(b.dtype)
  mean_delta = base.set_factors(lay, mean_delta, end.trainable, targets)
  factors = base.products(lay, jax.tree.map(jnp.add, end.trainable, mean_delta), end.frozen)
  return mean_delta, w_g, tuple(w - p for w, p in zip(w_g, factors))


def served(lay, state, trainable, frozen):
  """W + s·W_g: the kernels plus s·(W_g − A @ B), the trainable factors as they are."""
  factors = base.products(lay, trainable, frozen)
  return trainable, base.fold_all(lay, frozen, tuple(w - p for w, p in zip(state, factors)))


LORA_RULES.register('flexlora', base.LoraRuleSpec(
    base.Rule(server=server, init=init, served=served, uses_products=True),
    exact=True, plain_server_step=True, folds=True,
    client_dp='the average of the products and its SVD need every client\'s product, not '
              'only the noised sum of their updates',
    summary='the clients\' full products averaged, each client restarting from the '
            'truncated SVD at its rank; the global model keeps the full average'))
