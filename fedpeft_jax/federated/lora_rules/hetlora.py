"""HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): clients of different ranks; each starts from the global factors
truncated to its rank (its first r columns of A, rows of B), and the server zero-pads
their factors to the largest rank and averages them with sparsity weights: client i's
weight on an adapted map is ‖A_i B_i‖_F / Σ_j ‖A_j B_j‖_F (the paper's sparsity-weighted
aggregation; computed from r x r Gram matrices, ‖AB‖²_F = Σ (AᵀA) ∘ (BBᵀ)), not its
example count. The other trainable parameters (the head) average as usual.

Local rank self-pruning: our reading of the paper's Section 3 (arXiv 2401.06432); opt-in
(`self_pruning`: `peft.lora_prune_strength` λ > 0, `peft.lora_prune_decay` γ in (0, 1)).
A client of rank r has the tail of ranks k..r-1, k = max(1, ⌊γ r⌋): the ranks pruning
would drop. (The paper's tail starts at ⌊γ r⌋, the same for every r ≥ 1/γ; here a client
of rank 1 has no tail: it cannot prune, so it is not penalised.) Its local objective (the
mean loss over a batch) adds λ·‖A[:, k:r] B[k:r, :]‖_F per adapted map (without the scale
s; the paper has one module, here every map has its term and the client one rank for all),
so every local step's gradient gets λ·M Bₜᵀ/‖M‖ on A's tail columns and λ·Aₜᵀ M/‖M‖ on
B's tail rows, M = Aₜ Bₜ the tail's product (0 where M = 0: a subgradient; computed from
r x r Gram matrices, no [in, out]). After local training the client compares its tail
norm summed over the maps, Σ‖Aₜ Bₜ‖_F, with that of its start (the global factors cut to
r): if it is smaller (strictly), the client prunes to rank k (zeroes A's columns and B's
rows from k on before sending, so the sparsity weights and the zero-padded average use its
pruned factors) and trains at k from the next round on. Ranks never grow back. In round 1,
from LoRA's zero B, every tail starts at norm 0, so no client prunes before round 2.
Clients that drop out or send a NaN update keep their rank.

The current ranks are the rule's state (`PruneState`, int32 [num_clients] each, resumed
from the checkpoint with the rest); masks read them, so the round is compiled once as the
ranks shrink, and it is deterministic. Each round reports 'lora_mean_rank' (the mean
current rank over all clients after the round). Traffic: a client downloads its factors
at its rank at the round's start and uploads them at its rank after pruning. The default
γ 0.9 (ours, not the paper's) drops one rank at a time up to rank 10 and about a tenth of
a larger rank: a client's rank shrinks gradually, by at most one such step a round, so one
round's noisy decision costs little.

Under client DP the sparsity weights are per-client norms, not a noised sum: refused. Its
factors need the plain FedAvg step.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


class PruneState(NamedTuple):
  """Self-pruning's server state, int32 [num_clients] each."""
  ranks: jax.Array  # Each client's rank now: the rank it trains at in its next round.
  start: jax.Array  # Each client's rank at the start of the last round (its download).


def kept_ranks(max_rank: int, decay: float) -> np.ndarray:
  """int32 [max_rank + 1]: k(r) = max(1, ⌊decay·r⌋), the rank a client of rank r prunes to
  (r for r = 1; 0 at r = 0), computed once in float64 on the host."""
  r = np.arange(max_rank + 1)
  return np.where(r > 0, np.maximum(1, np.floor(decay * r)), 0).astype(np.int32)


def _tail(lay, kept, rank):
  """float32 [max rank]: 1 on the ranks k(rank)..rank-1, else 0."""
  index = jnp.arange(lay.rank)
  return ((index >= kept[rank]) & (index < rank)).astype(jnp.float32)


def _tail_factors(lay, site, params, tail):
  """A's tail columns [in, R] and B's tail rows [R, out] (the rest zeroed), float32."""
  a = base.get(params, site.a).astype(jnp.float32) * tail
  b = base.get(params, site.b).astype(jnp.float32)
  return a, b.reshape(b.shape[0], -1) * tail[:, None]


def _gram_norm(a, b):
  """‖A @ B‖_F and the Gram matrices AᵀA, BBᵀ [R, R] (‖AB‖²_F = Σ (AᵀA) ∘ (BBᵀ))."""
  highest = jax.lax.Precision.HIGHEST  # The pruning decision compares these: no TF32.
  gram_a, gram_b = jnp.matmul(a.T, a, precision=highest), jnp.matmul(b, b.T, precision=highest)
  return jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b), 0)), gram_a, gram_b


def tail_norm(lay, kept, params, rank):
  """Σ over the adapted maps of ‖Aₜ Bₜ‖_F, the tail of a client of `rank` (float32)."""
  tail = _tail(lay, kept, rank)
  return sum(_gram_norm(*_tail_factors(lay, site, params, tail))[0] for site in lay.sites)


def penalty_gradient(strength, kept, lay, grads, params, rank):
  """`grads` plus the gradient of strength·Σ_maps ‖Aₜ Bₜ‖_F at `params` (module
  docstring): A's tail gets strength·Aₜ(BₜBₜᵀ)/‖M‖, B's strength·(AₜᵀAₜ)Bₜ/‖M‖."""
  tail = _tail(lay, kept, rank)
  updates = {}
  for site in lay.sites:
    a, b = _tail_factors(lay, site, params, tail)
    norm, gram_a, gram_b = _gram_norm(a, b)
    scale = jnp.where(norm > 0, strength / jnp.maximum(norm, 1e-30), 0)
    for path, extra in ((site.a, scale * (a @ gram_b)), (site.b, scale * (gram_a @ b))):
      g = base.get(grads, path)
      updates[path] = (g.astype(jnp.float32) + extra.reshape(g.shape)).astype(g.dtype)
  return base.replace(grads, updates)


def send(kept, lay, state, done, starts, finals, ranks):
  """Each lane's pruning decision: rank k(r) where its tail norm after local training is
  below its start's, its factors cut there; the used lanes' new ranks into the state."""
  norm = jax.vmap(lambda params, rank: tail_norm(lay, kept, params, rank))
  prune = norm(finals, ranks) < norm(starts, ranks)
  new = jnp.where(prune, kept[ranks], ranks)
  finals = jax.vmap(lambda params, rank: base.mask_to_rank(lay, params, rank))(finals, new)
  return finals, state._replace(ranks=state.ranks.at[done.ids].add(done.used(new - ranks)))


def self_pruning(spec: base.LoraRuleSpec, strength: float, decay: float,
                 lay: base.Layout) -> base.LoraRuleSpec:
  """`spec` (HetLoRA's) with local rank self-pruning at penalty `strength` λ > 0 and decay
  `decay` γ in (0, 1) on the run's layout `lay` (module docstring). Raises ValueError for a
  strength or decay outside those (validation names the keys first) or a layout whose A
  or B is not trained."""
  if not strength > 0 or not 0 < decay < 1:
    raise ValueError(f'self-pruning needs strength > 0 and 0 < decay < 1, not '
                     f'{strength}, {decay}')
  if any(p not in lay.trained for s in lay.sites for p in (s.a, s.b)):
    raise ValueError('self-pruning needs A and B trained')
  kept = jnp.asarray(kept_ranks(lay.rank, decay))

  def init(lay, trainable, num_clients):
    ranks = (np.full(num_clients, lay.rank) if lay.ranks is None else lay.ranks)
    ranks = jnp.asarray(ranks, jnp.int32)
    return PruneState(ranks, ranks)

  rule = spec.rule._replace(
      init=init, ranks=lambda state: state.ranks,
      begin=lambda lay, state: state._replace(start=state.ranks),
      gradient=lambda *a: penalty_gradient(strength, kept, *a),
      send=lambda *a: send(kept, *a))
  return spec._replace(rule=rule, round_ranks=lambda state: (state.start, state.ranks))


LORA_RULES.register('hetlora', base.LoraRuleSpec(
    base.Rule(server=server, add_begin=add_begin, add=add),
    plain_server_step=True,
    client_dp='its sparsity weights are each client\'s ‖A_i·B_i‖, not a noised sum',
    summary='factors zero-padded to the largest rank and averaged with sparsity weights '
            '‖A_i·B_i‖_F (self-pruning with peft.lora_prune_strength > 0)'))
