"""HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): clients of different ranks; each starts from the global factors
truncated to its rank (its first r columns of A, rows of B), and the server zero-pads
their factors to the largest rank and averages them with sparsity weights: client i's
weight on an adapted map is ‖A_i B_i‖_F / Σ_j ‖A_j B_j‖_F (the paper's sparsity-weighted
aggregation; computed from r x r Gram matrices, ‖AB‖²_F = Σ (AᵀA) ∘ (BBᵀ)), not its
example count. The other trainable parameters (the head) average as usual.

Not done here: the paper's local rank self-pruning (a client drops its last ranks when
their norm is small); every client keeps its rank for the run. Under client DP the
sparsity weights are per-client norms, not a noised sum: refused. Its factors need the
plain FedAvg step.
"""
import jax.numpy as jnp

from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import base


def product_norms(a, b, r):
  """‖A_l (R_l) B_l‖_F per lane [lanes] from a [lanes, in, rank], b [lanes, rank, out...]."""
  a = a.astype(jnp.float32)
  if r is not None:
    a = jnp.einsum('lir,lrs->lis', a, r.astype(jnp.float32))
  b = b.astype(jnp.float32).reshape(b.shape[:2] + (-1,))
  gram_a = jnp.einsum('lir,lis->lrs', a, a)
  gram_b = jnp.einsum('lro,lso->lrs', b, b)
  return jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b, axis=(1, 2)), 0))


def add_begin(lay):
  """Per site: Σ weight, Σ weight x A, Σ weight x B (the sparsity weights)."""
  return tuple((jnp.zeros((), jnp.float32), jnp.zeros(lay.shapes[site.a], jnp.float32),
                jnp.zeros(lay.shapes[site.b], jnp.float32)) for site in lay.sites)


def add(lay, extra, lanes):
  out = []
  for (total, sum_a, sum_b), (a, b, r) in zip(extra, lanes.factors):
    norms = jnp.where(lanes.weight > 0, product_norms(a, b, r), 0)
    weigh = lambda x: jnp.einsum('l,l...->...', norms, x.astype(jnp.float32))
    out.append((total + norms.sum(), sum_a + weigh(a), sum_b + weigh(b)))
  return tuple(out)


def server(lay, sums, mean_delta, end):
  targets = {}
  for site, (total, sum_a, sum_b) in zip(lay.sites, sums.extra):
    for path, weighted in ((site.a, sum_a), (site.b, sum_b)):
      old = base.get(end.trainable, path)
      targets[path] = jnp.where(total > 0, weighted / jnp.maximum(total, 1e-30),
                                old).astype(old.dtype)
  return base.set_factors(lay, mean_delta, end.trainable, targets), sums.state, None


LORA_RULES.register('hetlora', base.LoraRuleSpec(
    base.Rule(server=server, add_begin=add_begin, add=add),
    plain_server_step=True,
    client_dp='its sparsity weights are each client\'s ‖A_i·B_i‖, not a noised sum',
    summary='factors zero-padded to the largest rank and averaged with sparsity weights '
            '‖A_i·B_i‖_F (no self-pruning)'))
