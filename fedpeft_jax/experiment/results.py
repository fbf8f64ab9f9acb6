"""`--mode=report`: the paper's evaluation of finished runs, as a table and figures.

Every run workdir under a root (any depth; a sweep's points, or hand-made runs) is
read back from its `config.json` and `metrics.jsonl` (and `partition.json`, where a
run wrote one). Runs whose configs differ only in `seed` form a group, named by the
config keys that differ between groups (`method=bias, dp=client`); the table gives each
group's mean ± std over seeds. Writes `report.md`, `report.csv` and the figures into
the root.

Round 0 (the initial model, which runs write before training; runs made before it have
none) is the initial accuracy, starts every curve (at 0 MiB and epsilon 0) and counts for
the traffic to the target (0 MiB if the initial model reaches it); final, best and swing
are of the trained model, rounds 1 on.

Runs are reported in their task's headline metric (a `Measure`): image runs in test
accuracy, text runs (whose metrics carry `test_perplexity`, the causal_lm task's) in test
perplexity, lower better: the same table and figures, named `perplexity_*`, best the
lowest, the target `report.target_perplexity` (None: no target column). A root that holds
both kinds is refused: their tables do not share columns.

Runs of a LoRA aggregation rule (`peft.lora_aggregation`) write `lora_aggregation_error`
every round (under client DP in `diagnostics`): when any run under the root has it, the
table gains a column, each run's mean over rounds 1 on, mean ± std over seeds ('-' for
groups without it), and the figure `aggregation_error_vs_round.png`. Reports of runs
without it are as they were.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
from typing import Any

import ml_collections
import numpy as np

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import workdir as workdir_lib

CONFIG_FILE, METRICS_FILE, PARTITION_FILE = 'config.json', 'metrics.jsonl', 'partition.json'
TARGET_KEY = 'report.target_accuracy'
TARGET_PERPLEXITY_KEY = 'report.target_perplexity'
# The paper's grid: always in a label when they differ between groups.
PAPER_AXES = ('peft.method', 'dp.mode', 'fl.num_clients', 'fl.clients_per_round',
              'data.partition', 'data.alpha', 'peft.lora_aggregation',
              'peft.lora_client_ranks')
# The last round is always evaluated; these and its measure's key make its row of the table.
LAST_ROUND_KEYS = ('bytes_cumulative', 'trainable_params', 'wall_s')
PARTITION_FIGURE = 'partition.png'
# A LoRA rule's relative aggregation error (lora_rules/base.py), a round's record key.
AGGREGATION_ERROR_KEY = 'lora_aggregation_error'
AGGREGATION_FIGURE = 'aggregation_error_vs_round.png'


class ReportError(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Measure:
  """The test metric a report is in: `key` in metrics.jsonl, `name` in column and figure
  names, its target's config key, and the range its ±std bands are clipped to."""
  key: str
  name: str
  higher_is_better: bool
  target_key: str
  bounds: tuple[float, float | None]

  def reaches(self, value: float, target: float) -> bool:
    return value >= target if self.higher_is_better else value <= target

  def best(self, values) -> float:
    return max(values) if self.higher_is_better else min(values)

  def figure(self, kind: str) -> str:
    """'accuracy_vs_round.png' for kind 'round'."""
    return f'{self.name}_vs_{kind}.png'


ACCURACY = Measure('test_accuracy', 'accuracy', True, TARGET_KEY, (0.0, 1.0))
# exp of the mean next-token cross-entropy (tasks/causal_lm.py): 1 at best, lower better.
PERPLEXITY = Measure('test_perplexity', 'perplexity', False, TARGET_PERPLEXITY_KEY,
                     (1.0, None))


def measure_of(metrics: list[dict]) -> Measure:
  """PERPLEXITY for a run whose records carry `test_perplexity` (a text run), else ACCURACY."""
  return PERPLEXITY if any(PERPLEXITY.key in r for r in metrics) else ACCURACY


@dataclasses.dataclass(frozen=True)
class Run:
  path: str
  config: dict[str, Any]  # Flat: {'fl.rounds': 10, 'peft.method': 'bias', ...}.
  metrics: list[dict]  # One record a round.
  partition: dict | None = None  # Its partition.json; None from runs made before it existed.

  @property
  def measure(self) -> Measure:
    return measure_of(self.metrics)

  @property
  def evaluated(self) -> list[dict]:
    """The evaluated records, round 0 (the initial model) included."""
    key = self.measure.key
    return [r for r in self.metrics if key in r]

  @property
  def trained(self) -> list[dict]:
    """The evaluated records after training: rounds 1 on."""
    return [r for r in self.evaluated if r['round'] > 0]

  @property
  def initial(self) -> dict | None:
    """Round 0's record; None in a run made before runs wrote one."""
    return next((r for r in self.evaluated if r['round'] == 0), None)

  @property
  def last(self) -> dict:
    return self.metrics[-1]

  @property
  def aggregation_errors(self) -> dict[int, float]:
    """{round: `lora_aggregation_error`} of rounds 1 on that have one (a number: null, a
    round that aggregated nobody, is left out), read from the record or, under client DP,
    its `diagnostics`; {} for runs without it."""
    errors_by_round = {}
    for record in self.metrics:
      value = record.get(AGGREGATION_ERROR_KEY,
                         record.get('diagnostics', {}).get(AGGREGATION_ERROR_KEY))
      if record['round'] > 0 and value is not None:
        errors_by_round[record['round']] = float(value)
    return errors_by_round


def find_runs(root: str) -> list[str]:
  """Every folder under `root` (itself included) holding a run's config or metrics."""
  if not os.path.isdir(root):
    raise ReportError(f'--workdir={root}: no such folder; give a sweep root or a folder '
                      'of run workdirs')
  runs = []
  for folder, subfolders, files in os.walk(root):
    if CONFIG_FILE in files or METRICS_FILE in files:
      runs.append(folder)
      subfolders.clear()  # A run's own folders (checkpoints/, tb/) hold no runs.
    subfolders.sort()
  if not runs:
    raise ReportError(f'--workdir={root}: no runs in it (no folder holds {METRICS_FILE} '
                      f'and {CONFIG_FILE}); give a sweep root or a folder of run workdirs')
  return runs


def _load_json(path: str):
  with open(path) as f:
    return json.load(f)


def _read_json(path: str, reader):
  try:
    return reader(path)
  except json.JSONDecodeError as e:
    raise ReportError(f'{path}: not valid JSON ({e.msg}); run its command again or move '
                      'the run out of the report folder') from None


def load_run(path: str) -> Run:
  """A finished run's config and metrics, or one error naming what is missing."""
  fix = 'finish the run (run its command again) or move it out of the report folder'
  missing = [f for f in (CONFIG_FILE, METRICS_FILE) if not os.path.exists(
      os.path.join(path, f))]
  if missing:
    raise ReportError(f'{path}: no {" and no ".join(missing)}; {fix}')
  nested = _read_json(os.path.join(path, CONFIG_FILE), _load_json)
  config = configs.flat_config(ml_collections.ConfigDict(nested))
  metrics = _read_json(os.path.join(path, METRICS_FILE), callbacks.read_metrics)
  if not metrics:
    raise ReportError(f'{path}/{METRICS_FILE} is empty; {fix}')
  for key in ('seed', 'fl.rounds'):
    if key not in config:
      raise ReportError(f'{path}/{CONFIG_FILE} has no {key}; it is not the config of a run')
  last = metrics[-1]
  if last['round'] != config['fl.rounds']:
    raise ReportError(f'{path}: unfinished, round {last["round"]} of fl.rounds='
                      f'{config["fl.rounds"]}; {fix}')
  absent = [k for k in (measure_of(metrics).key,) + LAST_ROUND_KEYS if k not in last]
  if absent:
    raise ReportError(f'{path}/{METRICS_FILE}: the last round ({last["round"]}) has no '
                      f'{", ".join(absent)}; {fix}')
  partition_path = os.path.join(path, PARTITION_FILE)
  partition = (_read_json(partition_path, _load_json) if os.path.exists(partition_path)
               else None)
  return Run(path, config, metrics, partition)


def _setting(run: Run) -> dict[str, Any]:
  """What makes a run's group: its config but the seed and the report's own settings."""
  return {k: v for k, v in run.config.items()
          if k != 'seed' and not k.startswith('report.')}


def _short_name(key: str) -> str:
  """'peft.method' -> 'method', 'dp.mode' -> 'dp', 'data.name' -> 'data'."""
  section, _, name = key.rpartition('.')
  return section if name in ('mode', 'name') and section else name


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
  """Runs that differ only in seed, by a label of the keys that differ between groups."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(json.dumps(_setting(run), sort_keys=True), []).append(run)
  for members in groups.values():
    seeds = [run.config['seed'] for run in members]
    twice = [run.path for run in members if seeds.count(run.config['seed']) > 1]
    if twice:
      raise ReportError(f'{" and ".join(twice)} are the same run (same config and seed): '
                        'move all but one out of the report folder')
  settings = [_setting(members[0]) for members in groups.values()]
  keys = label_keys(settings)
  names = [_short_name(k) for k in keys]
  names = names if len(set(names)) == len(names) else keys
  labelled = {', '.join(f'{name}={s.get(key)}' for name, key in zip(names, keys)): members
              for s, members in zip(settings, groups.values())}
  return dict(sorted(labelled.items()))


def label_keys(settings: list[dict[str, Any]]) -> list[str]:
  """The keys that name groups: every paper axis that differs, then any other key only if
  it tells groups apart that those do not (so a method's learning rate is left out)."""
  distinct = lambda keys: len({json.dumps([s.get(k) for k in keys]) for s in settings})
  keys = [k for k in PAPER_AXES if distinct([k]) > 1]
  for key in sorted({k for s in settings for k in s}):
    if key not in keys and distinct(keys + [key]) > distinct(keys):
      keys.append(key)
  return keys or ['peft.method']  # A lone group is named by its method.


def resolve_target(runs: list[Run], override: float | None) -> float | None:
  """`override`, else the runs' target of their measure (`report.target_accuracy`, or for
  text runs `report.target_perplexity`, where None is no target), which must agree."""
  measure, target = runs[0].measure, override
  if target is None:
    where = {}
    for run in runs:
      where.setdefault(run.config.get(measure.target_key), run.path)
    if len(where) > 1 or (None in where and measure is ACCURACY):
      found = '; '.join(f'{"none" if v is None else v} in {p}' for v, p in where.items())
      fix = ('pass --target_accuracy=F to compare them at one target' if measure is ACCURACY
             else f'set {measure.target_key} alike in their config.json files (none: no '
             'target)')
      raise ReportError(f'{measure.target_key} is missing or differs between runs ({found}): '
                        + fix)
    target = next(iter(where))
  if measure is ACCURACY and not 0 < target <= 1:
    raise ReportError(f'target accuracy {target}: must be a fraction in (0, 1], e.g. 0.7')
  if measure is PERPLEXITY and target is not None and not target >= 1:
    raise ReportError(f'{measure.target_key}={target}: a perplexity is at least 1; give '
                      'the perplexity to reach, e.g. 50')
  return target


def _mean_std(values) -> tuple[float, float | None]:
  """Mean and sample std (None for a single seed: no spread to estimate)."""
  values = [float(v) for v in values]
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def bytes_to_target(run: Run, target: float | None) -> int | None:
  """Bytes sent when the test metric first reached `target` (accuracy at least, perplexity
  at most; 0 if the initial model, round 0, did); None if it never did, or no target."""
  if target is None:
    return None
  measure = run.measure
  return next((r['bytes_cumulative'] for r in run.evaluated
               if measure.reaches(r[measure.key], target)), None)


def swing(run: Run) -> float | None:
  """How much the global model jumps about: the mean absolute change of the test metric
  (accuracy, or perplexity for text runs) between consecutive evaluations after training
  (client drift shows here; the step from the initial model, round 0, is learning, not
  drift); None with one evaluation."""
  values = [e[run.measure.key] for e in run.trained]
  return float(np.mean(np.abs(np.diff(values)))) if len(values) > 1 else None


def mean_aggregation_error(run: Run) -> float | None:
  """The run's `lora_aggregation_error` averaged over its rounds 1 on that have one; None
  for a run without it."""
  values = list(run.aggregation_errors.values())
  return statistics.fmean(values) if values else None


def summarize(label: str, runs: list[Run], target: float | None,
              aggregation: bool = False) -> dict[str, Any]:
  """A group's row of the table (report.csv): seed statistics of its runs' metrics, in
  their measure (`<name>` accuracy or perplexity; text rows add the initial std).

  `aggregation`: add `aggregation_error_mean` and `_std`, over the seeds that have one, of
  each run's `mean_aggregation_error` (None, None: no seed has it)."""
  measure = runs[0].measure
  key, name = measure.key, measure.name
  initial = [r.initial[key] for r in runs if r.initial is not None]
  initial_mean, initial_std = _mean_std(initial) if initial else (None, None)
  final_mean, final_std = _mean_std(r.last[key] for r in runs)
  best_mean, best_std = _mean_std(measure.best(e[key] for e in r.trained) for r in runs)
  swings = [s for s in map(swing, runs) if s is not None]
  swing_mean, swing_std = _mean_std(swings) if swings else (None, None)
  reached = [b for b in (bytes_to_target(r, target) for r in runs) if b is not None]
  # float(): a run without noise writes the string 'inf' (JSON has no infinity).
  epsilons = [float(r.last['epsilon']) for r in runs if 'epsilon' in r.last]
  # Round 0's, over the seeds that have one (None: runs made before round 0 was written).
  initial_columns = {f'initial_{name}_mean': initial_mean}
  if measure is PERPLEXITY:
    initial_columns[f'initial_{name}_std'] = initial_std
  row = {
      'group': label,
      'n': len(runs),
      **initial_columns,
      f'final_{name}_mean': final_mean,
      f'final_{name}_std': final_std,
      f'best_{name}_mean': best_mean,
      f'best_{name}_std': best_std,
      'swing_mean': swing_mean,
      'swing_std': swing_std,
      f'target_{name}': target,
      'reached_target': None if target is None else len(reached),
      'mib_to_target_mean': statistics.fmean(reached) / callbacks.MIB if reached else None,
      'total_mib_mean': statistics.fmean(r.last['bytes_cumulative'] for r in runs)
                        / callbacks.MIB,
      'trainable_params': runs[0].last['trainable_params'],  # Seeds share the model.
      'epsilon_mean': statistics.fmean(epsilons) if epsilons else None,
      'wall_s_mean': statistics.fmean(r.last['wall_s'] for r in runs),
      'rounds': runs[0].last['round'],
  }
  if aggregation:
    found = [e for e in map(mean_aggregation_error, runs) if e is not None]
    error_mean, error_std = _mean_std(found) if found else (None, None)
    row = _insert_after(row, 'total_mib_mean', {'aggregation_error_mean': error_mean,
                                                 'aggregation_error_std': error_std})
  return row


def _insert_after(row: dict, key: str, items: dict) -> dict:
  """`row` with `items` after `key`, in order."""
  result = {}
  for k, v in row.items():
    result[k] = v
    if k == key:
      result.update(items)
  return result


def curve(runs: list[Run], x_key: str):
  """(x, metric mean, metric std or None) over the rounds every seed evaluated with
  `x_key`, round 0 (the initial model) first where every seed has it; x is the seeds' mean
  (bytes and epsilon vary with the clients sampled). The metric: the runs' measure's
  (test accuracy, or perplexity for text runs)."""
  key = runs[0].measure.key
  by_round = [{r['round']: r for r in run.evaluated if x_key in r} for run in runs]
  rounds = sorted(set.intersection(*(set(b) for b in by_round)))
  x = np.mean([[float(b[t][x_key]) for t in rounds] for b in by_round], axis=0)
  values = np.array([[b[t][key] for t in rounds] for b in by_round])
  return x, values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else None


def _colors(groups) -> list:
  """A color a group, the same in every figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top (imported when drawing: 0.8 s)
  if len(groups) <= 10:
    return [f'C{i}' for i in range(len(groups))]
  return list(matplotlib.colormaps['turbo'](np.linspace(0, 1, len(groups))))


def _measure(groups: dict[str, list[Run]]) -> Measure:
  return next(iter(groups.values()))[0].measure


def _figure(xlabel: str, title: str, measure: Measure = ACCURACY):
  """Accuracy in percent; perplexity on a log axis (it spans decades from the initial
  model)."""
  from matplotlib import figure, ticker  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(10, 5), layout='constrained')
  ax = fig.subplots()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f'server test {measure.name}' + (' (log scale)' * (measure is PERPLEXITY)))
  ax.set_title(measure.name.capitalize() + title)
  if measure is ACCURACY:
    ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
  else:
    ax.set_yscale('log')
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False,
                                                     minor_thresholds=(2, 0.5)))
  ax.grid(alpha=0.3)
  return fig, ax


def _draw(ax, label, runs, x_key, color, x_scale=1.0):
  """A group's mean line and ±std band over seeds."""
  x, mean, std = curve(runs, x_key)
  ax.plot(x * x_scale, mean, marker='.', label=f'{label} (n={len(runs)})', color=color)
  if std is not None:
    low, high = runs[0].measure.bounds
    ax.fill_between(x * x_scale, np.clip(mean - std, low, high),
                    np.clip(mean + std, low, high), color=color, alpha=0.2, lw=0)


def _save(fig, path: str) -> str:
  labels = fig.axes[0].get_legend_handles_labels()[1]
  if max(map(len, labels), default=0) > 50:  # Long labels beside the plot would squeeze it.
    fig.set_figheight(fig.get_figheight() + 0.2 * len(labels))
    fig.legend(loc='outside lower center', fontsize='small')
  else:
    fig.legend(loc='outside right upper', fontsize='small')
  fig.savefig(path, dpi=120)
  return os.path.basename(path)


def plot_vs_round(groups: dict[str, list[Run]], path: str) -> str:
  """The groups' measure (accuracy, or perplexity for text runs) by round."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = _figure('round', ' by round', _measure(groups))
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    _draw(ax, label, runs, 'round', color)
  return _save(fig, path)


def plot_vs_communication(groups: dict[str, list[Run]], target: float | None,
                          path: str) -> str:
  """The paper's Figure 3: accuracy (perplexity for text runs) against cumulative
  traffic, and the target (none for text runs without `report.target_perplexity`).

  Traffic spans decades between methods, so the axis is logarithmic; from 0 MiB (round 0:
  the initial model) to the smallest traffic of a round it is linear (symlog), so every
  curve starts at the initial model.
  """
  measure = _measure(groups)
  fig, ax = _figure('MiB sent, up and down, all clients (log scale; linear from 0)',
                    ' by communication', measure)
  sent = [x for runs in groups.values() for x in curve(runs, 'bytes_cumulative')[0] if x > 0]
  ax.set_xscale('symlog', linthresh=min(sent, default=callbacks.MIB) / callbacks.MIB,
                linscale=0.5)  # The linear stretch: half a decade wide.
  if target is not None:
    ax.axhline(target, color='black', ls='--', lw=1,
               label=f'target {100 * target:g}%' if measure is ACCURACY
               else f'target perplexity {target:g}')
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    _draw(ax, label, runs, 'bytes_cumulative', color, 1 / callbacks.MIB)
  return _save(fig, path)


def plot_vs_epsilon(groups: dict[str, list[Run]], path: str) -> str:
  """DP groups against epsilon spent; the others' final accuracy (perplexity for text
  runs) as dotted lines."""
  measure = _measure(groups)
  fig, ax = _figure('epsilon spent', ' by privacy budget', measure)
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    if all('epsilon' in r.last for r in runs):
      _draw(ax, label, runs, 'epsilon', color)
    else:
      ax.axhline(statistics.fmean(r.last[measure.key] for r in runs), ls=':',
                 color=color, label=f'{label} (no DP, final)')
  return _save(fig, path)


# Exact rules' errors are float rounding (~1e-7), inexact ones' percents: the error axis is
# logarithmic above this and linear below, so an error of exactly 0 is drawn too.
AGGREGATION_LINTHRESH = 1e-8


def plot_aggregation_error_vs_round(groups: dict[str, list[Run]], path: str) -> str:
  """The LoRA rules' aggregation error by round (rounds 1 on; groups without it are left
  out, keeping their colour in the other figures): mean and ±std band over the seeds that
  have it, on the rounds every such seed has, on a symlog axis (`AGGREGATION_LINTHRESH`)."""
  from matplotlib import figure, ticker  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(10, 5), layout='constrained')
  ax = fig.subplots()
  ax.set_xlabel('round')
  ax.set_ylabel('aggregation error (log scale; linear below '
                f'{AGGREGATION_LINTHRESH:g})')
  ax.set_title('LoRA aggregation error by round: ‖Σp_i·A_i·B_i − served‖ / ‖Σp_i·A_i·B_i‖')
  ax.set_yscale('symlog', linthresh=AGGREGATION_LINTHRESH)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    found = [run.aggregation_errors for run in runs if run.aggregation_errors]
    if not found:
      continue
    rounds = sorted(set.intersection(*(set(e) for e in found)))
    values = np.array([[e[t] for t in rounds] for e in found])  # [seed, round]
    mean = values.mean(0)
    ax.plot(rounds, mean, marker='.', label=f'{label} (n={len(found)})', color=color)
    if len(found) > 1:
      std = values.std(0, ddof=1)
      ax.fill_between(rounds, np.clip(mean - std, 0, None), mean + std, color=color,
                      alpha=0.2, lw=0)
  return _save(fig, path)


# The names of the image-only report, which draws the same.
plot_accuracy_vs_round = plot_vs_round
plot_accuracy_vs_communication = plot_vs_communication
plot_accuracy_vs_epsilon = plot_vs_epsilon


def plot_partitions(runs: list[Run], path: str) -> str:
  """A row per distinct partition (runs of other methods on the same seed share one): each
  client's examples as a bar stacked by class, and its class mix as fractions."""
  from matplotlib import figure, ticker  # pylint: disable=g-import-not-at-top
  partitions: dict[str, list[Run]] = {}
  for run in runs:
    partitions.setdefault(json.dumps(run.partition, sort_keys=True), []).append(run)
  fig = figure.Figure(figsize=(14, 1 + 3 * len(partitions)), layout='constrained')
  for axes, members in zip(fig.subplots(len(partitions), 2, squeeze=False),
                           partitions.values()):
    p = members[0].partition
    counts = np.array([c['label_histogram'] for c in p['clients']], dtype=float)
    clients = np.arange(len(counts))
    args = ', '.join(f'{_short_name(k)}={v}' for k, v in p['args'].items())
    shares = counts / counts.sum(1, keepdims=True).clip(1)  # An empty client stays empty.
    for ax, values, ylabel in ((axes[0], counts, 'examples'),
                               (axes[1], shares, 'share of its examples')):
      bottom = np.zeros(len(counts))
      for name, column, color in zip(p['class_names'], values.T, _colors(p['class_names'])):
        ax.bar(clients, column, bottom=bottom, width=0.9, color=color, label=name)
        bottom += column
      ax.set_xlabel('client')
      ax.set_ylabel(ylabel)
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes[0].set_title(p['method'] + (f' ({args})' if args else '') +
                      f': {len(clients)} clients, used by {len(members)} run'
                      + ('s' * (len(members) > 1)), loc='left')
    if len(p['class_names']) <= 20:
      axes[1].legend(title='class', fontsize='small', loc='center left',
                     bbox_to_anchor=(1, 0.5))
  fig.savefig(path, dpi=100)
  return os.path.basename(path)


def _percent(mean: float, std: float | None) -> str:
  return f'{100 * mean:.2f}' + ('' if std is None else f' ± {100 * std:.2f}')


def _plain(mean: float, std: float | None) -> str:
  return f'{mean:.2f}' + ('' if std is None else f' ± {std:.2f}')


def _small(mean: float | None, std: float | None) -> str:
  """3 significant digits ('-' for None): errors span 1e-7 (rounding) to 1."""
  if mean is None:
    return '-'
  return f'{mean:.3g}' + ('' if std is None else f' ± {std:.2g}')


def _measure_columns(measure: Measure, target: float | None) -> tuple[list[str], str]:
  """The headers of the measure's columns (initial, final, best, swing and, with a
  target, MiB to it) and the note on them above the table."""
  if measure is ACCURACY:
    return (['initial accuracy (%)', 'final accuracy (%)', 'best accuracy (%)',
             'swing (points)', f'MiB to {100 * target:g}% (seeds that reached it)'],
            'initial: round 0, the model before training (mean); best and swing are over '
            'rounds 1 on; swing: mean absolute change of test accuracy between consecutive '
            'evaluations, in points; traffic counts every client, up and down (the target '
            'may be reached at 0 MiB, by the initial model)')
  return (['initial perplexity', 'final perplexity', 'best (lowest) perplexity',
           'swing (perplexity)'] + ([] if target is None else [
               f'MiB to perplexity {target:g} (seeds that reached it)']),
          'test perplexity: exp of the mean next-token cross-entropy over the test split\'s '
          'predicted tokens, lower is better; initial: round 0, the model before training; '
          'best (the lowest) and swing are over rounds 1 on; swing: mean absolute change of '
          'test perplexity between consecutive evaluations; traffic counts every client, up '
          'and down ' + ('(no target: report.target_perplexity is unset)' if target is None
                        else '(the target may be reached at 0 MiB, by the initial model)'))


def markdown(root: str, groups: dict[str, list[Run]], rows: dict[str, dict],
             target: float | None, figures: list[str]) -> str:
  """report.md: the table of `rows` in the groups' measure, the figures, the runs."""
  measure = _measure(groups)
  columns, note = _measure_columns(measure, target)
  aggregation = 'aggregation_error_mean' in next(iter(rows.values()))
  header = ['group', 'n', *columns, 'total MiB', *['aggregation error'] * aggregation,
            'trainable', 'epsilon', 'wall (s)', 'rounds']
  if aggregation:
    note += ('; aggregation error: a LoRA rule\'s `lora_aggregation_error` (‖Σp_i·A_i·B_i '
             '− served‖_F / ‖Σp_i·A_i·B_i‖_F, averaged over the adapted maps; 0 for exact '
             'rules), each run\'s mean over rounds 1 on (- for groups without it)')
  lines = [f'# Results of {root}', '',
           f'{sum(map(len, groups.values()))} runs in {len(groups)} groups: runs that differ '
           'only in `seed` form a group, named by the config keys that differ between '
           f'groups. Mean ± sample std over seeds; {note}; epsilon and wall time are the '
           'last round\'s.', '',
           '| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
  show, metric = _percent if measure is ACCURACY else _plain, measure.name
  for label, row in rows.items():
    to_target = (f'{row["mib_to_target_mean"]:.2f}' if row['reached_target'] else '-')
    initial = row[f'initial_{metric}_mean']
    cells = [label, row['n'],
             '-' if initial is None else show(initial, row.get(f'initial_{metric}_std')),
             show(row[f'final_{metric}_mean'], row[f'final_{metric}_std']),
             show(row[f'best_{metric}_mean'], row[f'best_{metric}_std']),
             '-' if row['swing_mean'] is None else show(row['swing_mean'], row['swing_std']),
             *([] if target is None else [f'{to_target} ({row["reached_target"]}/{row["n"]})']),
             f'{row["total_mib_mean"]:.2f}',
             *([_small(row['aggregation_error_mean'], row['aggregation_error_std'])]
               if aggregation else []), f'{row["trainable_params"]:,}',
             '-' if row['epsilon_mean'] is None else f'{row["epsilon_mean"]:.3g}',
             f'{row["wall_s_mean"]:.1f}', row['rounds']]
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  lines += [''] + [f'![{name[:-4]}]({name})' for name in figures]
  lines += ['', '## Runs', ''] + [
      f'- {label}: ' + ', '.join(f'`{os.path.relpath(r.path, root)}`' for r in runs)
      for label, runs in groups.items()]
  return '\n'.join(lines) + '\n'


def one_measure(root: str, runs: list[Run]) -> Measure:
  """The measure every run under `root` is reported in; a root mixing image runs
  (accuracy) and text runs (perplexity) is a ReportError naming one of each."""
  kinds = {}
  for run in runs:
    kinds.setdefault(run.measure, run.path)
  if len(kinds) > 1:
    raise ReportError(f'--workdir={root} mixes runs reported in accuracy (e.g. '
                      f'{kinds[ACCURACY]}) and text runs reported in perplexity (e.g. '
                      f'{kinds[PERPLEXITY]}): report each kind from a folder of its own')
  return next(iter(kinds))


def write_report(root: str, target_accuracy: float | None = None,
                 target_perplexity: float | None = None) -> dict:
  """Writes `report.md`, `report.csv` and the figures of every run under `root`; returns
  the table, {group label: row}: the rows of report.csv.

  In the runs' measure (`one_measure`): image runs in accuracy (`accuracy_vs_*.png`,
  target `target_accuracy`, default their `report.target_accuracy`), text runs in
  perplexity (`perplexity_vs_*.png`, target `target_perplexity`, default their
  `report.target_perplexity`; None: no target). The other measure's target is a
  ReportError: it would be ignored.
  """
  root = os.path.abspath(root)
  runs = [load_run(path) for path in find_runs(root)]
  measure = one_measure(root, runs)
  if measure is PERPLEXITY and target_accuracy is not None:
    raise ReportError(f'--target_accuracy={target_accuracy}: the runs under {root} are '
                      'text runs, reported in perplexity; their target is '
                      f'{PERPLEXITY.target_key} in their configs')
  if measure is ACCURACY and target_perplexity is not None:
    raise ReportError(f'target perplexity {target_perplexity}: the runs under {root} are '
                      'reported in accuracy; give --target_accuracy=F instead')
  target = resolve_target(
      runs, target_accuracy if measure is ACCURACY else target_perplexity)
  groups = group_runs(runs)
  aggregation = any(run.aggregation_errors for run in runs)
  rows = {label: summarize(label, members, target, aggregation)
          for label, members in groups.items()}
  workdir_lib.prepare(root)  # Proves it writable, with a one-line error if not.

  with open(os.path.join(root, 'report.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(next(iter(rows.values()))))
    writer.writeheader()
    writer.writerows(rows.values())
  figures = [plot_vs_round(groups, os.path.join(root, measure.figure('round'))),
             plot_vs_communication(groups, target,
                                   os.path.join(root, measure.figure('communication')))]
  epsilon_path = os.path.join(root, measure.figure('epsilon'))
  if any('epsilon' in run.last for run in runs):
    figures.append(plot_vs_epsilon(groups, epsilon_path))
  elif os.path.exists(epsilon_path):
    os.remove(epsilon_path)  # Stale: from DP runs no longer here.
  aggregation_path = os.path.join(root, AGGREGATION_FIGURE)
  if aggregation:
    figures.append(plot_aggregation_error_vs_round(groups, aggregation_path))
  elif os.path.exists(aggregation_path):
    os.remove(aggregation_path)  # Stale: from LoRA rule runs no longer here.
  partition_path = os.path.join(root, PARTITION_FIGURE)
  # Older runs have no partition.json; DP runs write one without per-client sizes and
  # histograms (they are outside what epsilon covers): neither is drawn.
  described = [run for run in runs if run.partition is not None and 'clients' in run.partition]
  if described:
    figures.append(plot_partitions(described, partition_path))
  elif os.path.exists(partition_path):
    os.remove(partition_path)
  text = markdown(root, groups, rows, target, figures)
  with open(os.path.join(root, 'report.md'), 'w') as f:
    f.write(text)
  print(''.join(line + '\n' for line in text.splitlines() if line.startswith('|')), end='')
  print(f'wrote {root}/report.md, report.csv, {", ".join(figures)}')
  return rows
