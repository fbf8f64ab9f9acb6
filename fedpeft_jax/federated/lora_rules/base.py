"""What the LoRA rules share: the run's LoRA `Layout`, the generic round of a rule
(`algorithm`), the clients' products summed streamingly and the aggregation error.

Notation (this project's layout, x @ W): an adapted map's update is s·A @ B (s = alpha /
rank; the papers' B·A), with A [in, r], B [r, out...] and, for Fed-SB, A @ R @ B. Client
i of a round ends local training with factors A_i, B_i (its start plus its update); p_i
are the aggregator's weights of the clients it aggregates (example counts, or uniform),
normalised. Every rule's round:

- clients start from the rule's factors (`Rule.start`; default the global ones), cut to
  their rank (`Layout.ranks`: factors are held at the largest rank, a client of rank r
  trains its first r columns of A and rows of B, its gradients masked there too), so
  clients of every rank train in the one vmapped round; a rule whose clients shrink their
  rank (HetLoRA's self-pruning) keeps the ranks in its state instead (`Rule.ranks`), and
  says what each client sends after local training (`Rule.send`);
- `add_clients` sums w_i·A_i @ B_i over the used clients into one float32 [in, out] per
  adapted map (w_i the aggregator's weights, never a client at a time in memory: chunks
  and packed lanes add theirs as they finish), with the rule's own sums (`Rule.add`);
- the rule's server step (`Rule.server`) turns the sums and the aggregator's mean update
  into the new global factors and its state;
- the aggregation error (`aggregation_error`) compares the ideal Σp_i A_i B_i with what
  the server serves, in metrics as 'lora_aggregation_error'.

Each client's update (`ClientsDone.delta`) is from its own start, so the aggregator
(the weighted mean, or DP-FedAvg's clipped and noised sum) sees what the client changed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax.federated.algorithms.base import (Algorithm, ClientsDone, RoundEnd,
                                                   identity_frozen)
from fedpeft_jax.peft import lora

PyTree = Any
ERROR_KEY = 'lora_aggregation_error'  # The RoundMetrics.algorithm key of the error.
RANK_KEY = 'lora_mean_rank'  # Its key of the clients' mean rank, when they change it.


class Layout(NamedTuple):
  """The run's adapted maps and ranks, from the trainable and frozen trees (`layout`)."""
  sites: tuple[lora.Site, ...]
  trained: frozenset  # The LoRA factor paths in the trainable tree.
  frozen_kernels: frozenset  # The sites' kernel paths that are in the frozen tree.
  shapes: dict  # Path -> shape of every factor of the sites.
  scale: float  # alpha / rank.
  rank: int  # The factors' rank: the largest client's.
  ranks: Optional[np.ndarray] = None  # int32 [num_clients]: each client's; None: `rank`.

  @property
  def heterogeneous(self) -> bool:
    return self.ranks is not None and bool(np.any(self.ranks != self.rank))

  def dims(self, site: lora.Site) -> tuple[int, int]:
    """(in, out) of the map's dense update (B's output axes flattened)."""
    return self.shapes[site.a][0], math.prod(self.shapes[site.b][1:])

  def has_r(self, site: lora.Site) -> bool:
    return site.r in self.shapes


def layout(trainable, frozen, scale: float, ranks: Optional[np.ndarray] = None) -> Layout:
  """The `Layout` of LoRA parameters split into `trainable` and `frozen` (arrays or
  shape structs), with update scale `scale` and, for clients of different ranks, each
  client's `ranks` (int [num_clients], at most the factors' rank)."""
  flat_t = traverse_util.flatten_dict(trainable)
  flat_f = traverse_util.flatten_dict(frozen)
  sites = lora.sites(trainable, frozen)
  shapes, trained, kernels = {}, set(), set()
  for site in sites:
    for path in (site.a, site.b, site.r):
      if path in flat_t or path in flat_f:
        shapes[path] = tuple((flat_t if path in flat_t else flat_f)[path].shape)
        if path in flat_t:
          trained.add(path)
    if site.kernel in flat_f:
      kernels.add(site.kernel)
  rank = shapes[sites[0].a][-1] if sites else 0
  return Layout(sites, frozenset(trained), frozenset(kernels), shapes, scale, rank,
                None if ranks is None else np.asarray(ranks, np.int32))


def get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def replace(tree, updates: dict):
  """`tree` (nested dicts) with the leaves at the paths of `updates` replaced."""
  if not updates:
    return tree
  flat = traverse_util.flatten_dict(tree)
  flat.update(updates)
  return traverse_util.unflatten_dict(flat)


def factors(lay: Layout, site: lora.Site, trainable, frozen):
  """(A, B, R or None) of a site, each from the tree that holds it."""
  pick = lambda path: get(trainable if path in lay.trained else frozen, path)
  return pick(site.a), pick(site.b), pick(site.r) if lay.has_r(site) else None


def products(lay: Layout, trainable, frozen) -> tuple:
  """A @ (R @) B of every site, float32 [in, out] each (`lora.product`)."""
  return tuple(lora.product(*factors(lay, site, trainable, frozen)) for site in lay.sites)


def mask_to_rank(lay: Layout, tree, rank):
  """`tree` (trainable-shaped: parameters or their gradients) with every trained factor
  cut to `rank`: A's columns, B's rows and R's rows and columns from `rank` on zeroed."""
  updates = {}
  for site in lay.sites:
    for path, axes in ((site.a, (-1,)), (site.b, (0,)), (site.r, (0, 1))):
      if path in lay.trained:
        x = get(tree, path)
        for axis in axes:
          x = lora.mask_rank(x, rank, axis)
        updates[path] = x
  return replace(tree, updates)


def fold_all(lay: Layout, frozen, dense: tuple):
  """`frozen` with every site's kernel plus scale x its dense update (`lora.fold`)."""
  return replace(frozen, {site.kernel: lora.fold(get(frozen, site.kernel), d, lay.scale)
                          for site, d in zip(lay.sites, dense)})


def weighted_product_sum(a, b, r, weight):
  """Σ_l w_l A_l (R_l) B_l over lanes l: float32 [in, out] from a [lanes, in, rank],
  b [lanes, rank, out...], r [lanes, rank, rank] or None, weight [lanes]; contracted over
  lanes and rank at once (no [lanes, in, out] in memory)."""
  a = a.astype(jnp.float32) * weight[:, None, None]
  if r is not None:
    a = jnp.einsum('lir,lrs->lis', a, r.astype(jnp.float32))
  b = b.astype(jnp.float32).reshape(b.shape[:2] + (-1,))
  return jnp.einsum('lir,lro->io', a, b)


def aggregation_error(product_sums: tuple, weight, served: tuple):
  """mean over sites of ‖Σp_i A_i B_i − served‖_F / ‖Σp_i A_i B_i‖_F, p_i = w_i / Σw:
  float32 scalar; NaN when no client was aggregated (Σw = 0)."""
  ratios = []
  for total, dense in zip(product_sums, served):
    ideal = total / jnp.maximum(weight, 1e-30)
    ratios.append(jnp.linalg.norm(ideal - dense) / jnp.maximum(jnp.linalg.norm(ideal), 1e-30))
  if not ratios:
    return jnp.float32(jnp.nan)
  return jnp.where(weight > 0, jnp.mean(jnp.stack(ratios)), jnp.nan).astype(jnp.float32)


class Sums(NamedTuple):
  """A round's running sums over the used clients (`Algorithm.begin`/`add_clients`)."""
  state: PyTree  # The rule's state, as updated so far (FedSA-LoRA's per-client B).
  weight: jax.Array  # Σ w_i.
  products: tuple  # Σ w_i A_i (R_i) B_i per site, float32 [in, out].
  extra: PyTree  # The rule's own sums (`Rule.add`).


class Lanes(NamedTuple):
  """A group of finished clients as the rule's `add` sees them (unused lanes zero)."""
  final: PyTree  # [lanes, ...]: each client's trainable tree after local training.
  weight: jax.Array  # float32 [lanes]: w_i.
  factors: tuple  # Per site (A, B, R or None), each [lanes, ...] (frozen ones broadcast).
  done: ClientsDone


class Rule(NamedTuple):
  """A rule's own parts of the generic round (`algorithm`); the rest is shared.

  server(layout, sums, mean_delta, end) -> (mean_delta, state, dense): the update the
    server optimizer applies (the aggregator's mean for what the rule does not set), the
    rule's new state, and what the served model adds to the new factors' products beyond
    them, per site (float32 [in, out]; None: nothing), for the aggregation error.
  init(layout, trainable, num_clients) -> state.
  client_part(layout, state, client) -> what `start` needs of the client (its own B).
  start(layout, global trainable, client part) -> its start, before the rank cut.
  add_begin(layout) -> extra; add(layout, extra, Lanes) -> extra: the rule's own sums.
  update(layout, state, ClientsDone) -> state: per-client state after a group finishes.
  frozen(layout, state, frozen) -> the frozen tree clients and evaluation see.
  served(layout, state, trainable, frozen) -> (trainable, frozen) as evaluated.
  uses_products: `server` reads the clients' products' sum (`Sums.products`, `ideal`), so
    it is summed even when the aggregation error is not measured.

  For a rule whose clients change their rank during the run (HetLoRA's self-pruning):
  ranks(state) -> int32 [num_clients]: each client's rank, read from the rule's state
    (instead of `Layout.ranks`); clients train at it (masked as for mixed ranks, compiled
    once whatever the ranks), and the round reports its mean as 'lora_mean_rank'.
  begin(layout, state) -> state: the state at the start of a round's sums.
  gradient(layout, grads, params, rank) -> grads: the rule's own term added to every local
    step's gradients of a client of `rank` (before the rank mask).
  send(layout, state, ClientsDone, starts, finals, ranks) -> (finals, state): what the
    clients send after local training, from their starts, their trained trees and their
    ranks ([lanes, ...] each), and the state recording it; the sums and `add` see the
    factors sent.
  """
  server: Callable[..., tuple]
  init: Callable[..., PyTree] = lambda lay, trainable, num_clients: ()
  client_part: Optional[Callable[..., PyTree]] = None
  start: Optional[Callable[..., PyTree]] = None
  add_begin: Callable[[Layout], PyTree] = lambda lay: ()
  add: Callable[..., PyTree] = lambda lay, extra, lanes: extra
  update: Callable[..., PyTree] = lambda lay, state, done: state
  frozen: Optional[Callable[..., PyTree]] = None
  served: Optional[Callable[..., tuple]] = None
  uses_products: bool = False
  ranks: Optional[Callable[[PyTree], jax.Array]] = None
  begin: Callable[..., PyTree] = lambda lay, state: state
  gradient: Optional[Callable[..., PyTree]] = None
  send: Optional[Callable[..., tuple]] = None


def _lane_factors(lay: Layout, final, frozen, lanes: int) -> tuple:
  def pick(path):
    if path in lay.trained:
      return get(final, path)
    x = get(frozen, path)
    return jnp.broadcast_to(x, (lanes,) + x.shape)
  return tuple((pick(s.a), pick(s.b), pick(s.r) if lay.has_r(s) else None)
               for s in lay.sites)


def algorithm(lay: Layout, rule: Rule, measure_error: bool = True) -> Algorithm:
  """The federated `Algorithm` of `rule` on the adapted maps of `lay` (module docstring).

  `measure_error=False` skips the aggregation error: a rule that does not read the
  products' sum (`Rule.uses_products`) then keeps no dense float32 [in, out] per adapted
  map (about 4 GiB for Llama-2-7B's q and v), and the round reports no error."""
  varying = rule.ranks is not None  # The ranks are the rule's state, not the layout's.
  hetero = lay.heterogeneous or varying
  sum_products = measure_error or rule.uses_products
  ranks = jnp.asarray(lay.ranks) if lay.heterogeneous else None
  personal = hetero or rule.start is not None

  def client_input(state, shared, client):
    if varying:
      rank = rule.ranks(state)[client]
    else:
      rank = ranks[client] if hetero else jnp.int32(lay.rank)
    part = None if rule.client_part is None else rule.client_part(lay, state, client)
    return rank, part

  def start(trainable, inputs):
    rank, part = inputs
    if rule.start is not None:
      trainable = rule.start(lay, trainable, part)
    return mask_to_rank(lay, trainable, rank) if hetero else trainable

  def begin(state):
    zeros = tuple(jnp.zeros(lay.dims(site), jnp.float32) for site in lay.sites
                  if sum_products)
    return Sums(rule.begin(lay, state), jnp.zeros((), jnp.float32), zeros,
                rule.add_begin(lay))

  def add_clients(sums: Sums, shared, done: ClientsDone):
    state = sums.state
    if personal:
      inputs = jax.vmap(lambda c: client_input(shared, shared, c))(done.ids)
      starts = jax.vmap(lambda i: start(done.trainable, i))(inputs)
      final = jax.tree.map(jnp.add, starts, done.delta)
      if rule.send is not None:  # inputs[0]: each lane's rank.
        final, state = rule.send(lay, state, done, starts, final, inputs[0])
    else:
      final = jax.tree.map(lambda w, d: w + d, done.trainable, done.delta)
    final = jax.tree.map(done.used, final)
    weight = done.used(done.weight.astype(jnp.float32))
    lane_factors = _lane_factors(lay, final, done.frozen, weight.shape[0])
    total = tuple(p + weighted_product_sum(a, b, r, weight)
                  for p, (a, b, r) in zip(sums.products, lane_factors))  # () if not summed.
    extra = rule.add(lay, sums.extra, Lanes(final, weight, lane_factors, done))
    return Sums(rule.update(lay, state, done), sums.weight + weight.sum(), total, extra)

  def finish_round(sums: Sums, mean_delta, end: RoundEnd):
    mean_delta, state, dense = rule.server(lay, sums, mean_delta, end)
    metrics = ({} if not varying else
               {RANK_KEY: jnp.mean(rule.ranks(state).astype(jnp.float32))})
    if not measure_error:
      return mean_delta, state, metrics
    served = products(lay, jax.tree.map(jnp.add, end.trainable, mean_delta), end.frozen)
    if dense is not None:
      served = tuple(p + d for p, d in zip(served, dense))
    error = aggregation_error(sums.products, sums.weight, served)
    return mean_delta, state, {ERROR_KEY: error, **metrics}

  def gradient(grads, params, global_params, inputs):
    if rule.gradient is not None:
      grads = rule.gradient(lay, grads, params, inputs[0])
    return mask_to_rank(lay, grads, inputs[0])

  return Algorithm(
      init=lambda trainable, num_clients: rule.init(lay, trainable, num_clients),
      round_input=lambda state: state,
      client_input=client_input if personal else (lambda state, shared, client: None),
      gradient=gradient if hetero else Algorithm().gradient,
      begin=begin, add_clients=add_clients, finish_round=finish_round,
      start=start if personal else None,
      frozen=(identity_frozen if rule.frozen is None else
              lambda state, frozen: rule.frozen(lay, state, frozen)),
      served=(None if rule.served is None else
              lambda state, trainable, frozen: rule.served(lay, state, trainable, frozen)))


def ideal(sums: Sums) -> tuple:
  """Σp_i A_i B_i per site (zeros when no client was aggregated)."""
  return tuple(p / jnp.maximum(sums.weight, 1e-30) for p in sums.products)


def set_factors(lay: Layout, mean_delta, trainable, targets: dict):
  """`mean_delta` with the factors at the paths of `targets` set so that the server's
  plain step (trainable + mean_delta) lands on the targets."""
  return replace(mean_delta, {path: (value - get(trainable, path)).astype(
      get(mean_delta, path).dtype) for path, value in targets.items()})


def factor_floats(lay: Layout, rank: int, kinds=('a', 'b', 'r')) -> int:
  """Numbers in the trained factors of `kinds` at `rank` (a client's share of them)."""
  total = 0
  for site in lay.sites:
    inputs, outputs = lay.dims(site)
    sizes = {'a': inputs * rank, 'b': rank * outputs, 'r': rank * rank}
    total += sum(sizes[k] for k in kinds if getattr(site, k) in lay.trained)
  return total


def dense_floats(lay: Layout) -> int:
  """Numbers in the adapted maps' dense updates: Σ in x out."""
  return sum(math.prod(lay.dims(site)) for site in lay.sites)


def factors_both_ways(lay: Layout, rank: int, round_index: int) -> tuple[int, int]:
  """The default traffic of a client of `rank`: its trained factors down and up."""
  floats = factor_floats(lay, rank)
  return floats, floats


class LoraRuleSpec(NamedTuple):
  """A registered rule (`LORA_RULES.register(name, LoraRuleSpec(...))`).

  rule: its `Rule`. summary: one line for the README. exact: its served update is the
  average of the clients' products (aggregation error 0 to float rounding).
  client_dp: None if it runs under dp.mode='client' (its server step needs only the
  noised sum), else why not (one line, said when refused). plain_server_step: its exactness
  or its factors need the plain FedAvg step (fl.server_optimizer=sgd at lr 1). folds: it
  changes the frozen kernels (they must be frozen). any_algorithm: its server step is
  FedAvg's own (what it changes is what LoRA trains), so under another fl.algorithm
  (SCAFFOLD, FedNova) that algorithm runs as it is, without the aggregation error; the
  others need FedAvg's round (`BASE_ALGORITHMS`). traffic(layout, rank, round) ->
  (floats down, floats up) of LoRA a client of `rank` exchanges in round `round` (1-based),
  besides the other trainable parameters. round_ranks(rule state after a round) -> (down,
  up), int [num_clients] each: for a rule whose clients change their rank, each client's
  rank at the round's start (what it downloads) and after it (what it sent); None: the
  layout's ranks both ways.
  """
  rule: Rule
  summary: str
  exact: bool = False
  client_dp: Optional[str] = None
  plain_server_step: bool = False
  folds: bool = False
  any_algorithm: bool = False
  traffic: Callable[[Layout, int, int], tuple[int, int]] = factors_both_ways
  round_ranks: Optional[Callable[[PyTree], tuple]] = None


# The fl.algorithm values a rule's round is built on: FedAvg, and FedAvg with FedProx's
# proximal term (a gradient hook that composes with the rules').
BASE_ALGORITHMS = ('fedavg', 'fedprox')


def client_bytes(spec: LoraRuleSpec, lay: Layout, other_floats: int, num_clients: int,
                 bytes_per_float: int = 4) -> Callable:
  """`bytes(ids, round, state) -> (down, up)`, int64 [len(ids)] each: what each client of
  `ids` (int array) exchanges in round `round` (1-based) under `spec`: its rank's LoRA
  (`LoraRuleSpec.traffic`) and the `other_floats` other trainable numbers, each way.
  `state`: the server state after that round, read when the rule's clients change their
  rank (`LoraRuleSpec.round_ranks`: down at the round's start rank, up at the rank after);
  otherwise ignored (may be None). Raises ValueError if such a rule gets no state."""
  ranks = lay.ranks if lay.ranks is not None else np.full(num_clients, lay.rank, np.int32)
  cache = {}

  def per_rank(rank: int, round_index: int):
    key = (rank, min(round_index, 2))  # Rules differ between round 1 and the rest only.
    if key not in cache:
      down, up = spec.traffic(lay, rank, round_index)
      cache[key] = ((down + other_floats) * bytes_per_float,
                    (up + other_floats) * bytes_per_float)
    return cache[key]

  def sizes(ids, round_index: int, state=None):
    down_ranks = up_ranks = ranks
    if spec.round_ranks is not None:
      if state is None:
        raise ValueError('this rule\'s clients change their rank: pass the state after the '
                         'round')
      down_ranks, up_ranks = (np.asarray(r) for r in spec.round_ranks(state.algorithm_state))
    ids = np.asarray(ids).reshape(-1)
    return (np.asarray([per_rank(int(down_ranks[i]), round_index)[0] for i in ids], np.int64),
            np.asarray([per_rank(int(up_ranks[i]), round_index)[1] for i in ids], np.int64))

  return sizes


def check_layout(name: str, spec: LoraRuleSpec, lay: Layout) -> None:
  """Raises `UserError` (argument 'rule') if the rule cannot run on `lay`."""
  if not lay.sites:
    raise errors.UserError(f'{name!r} aggregates LoRA factors: the model has none; add '
                           "'lora' to peft.method", argument='rule')
  if spec.folds and len(lay.frozen_kernels) < len(lay.sites):
    raise errors.UserError(
        f'{name!r} merges updates into the adapted maps\' kernels, which this peft.method '
        'trains: use a method that leaves them frozen (e.g. lora, bias+lora)',
        argument='rule')
