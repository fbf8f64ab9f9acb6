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
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
from typing import Any

import matplotlib
import ml_collections
import numpy as np
from matplotlib import figure
from matplotlib import ticker

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import workdir as workdir_lib

CONFIG_FILE, METRICS_FILE, PARTITION_FILE = 'config.json', 'metrics.jsonl', 'partition.json'
TARGET_KEY = 'report.target_accuracy'
# The paper's grid: always in a label when they differ between groups.
PAPER_AXES = ('peft.method', 'dp.mode', 'fl.num_clients', 'fl.clients_per_round',
              'data.partition', 'data.alpha')
# The last round is always evaluated; these make its row of the table.
LAST_ROUND_KEYS = ('test_accuracy', 'bytes_cumulative', 'trainable_params', 'wall_s')
EPSILON_FIGURE, PARTITION_FIGURE = 'accuracy_vs_epsilon.png', 'partition.png'


class ReportError(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  path: str
  config: dict[str, Any]  # Flat: {'fl.rounds': 10, 'peft.method': 'bias', ...}.
  metrics: list[dict]  # One record a round.
  partition: dict | None = None  # Its partition.json; None from runs made before it existed.

  @property
  def evaluated(self) -> list[dict]:
    """The evaluated records, round 0 (the initial model) included."""
    return [r for r in self.metrics if 'test_accuracy' in r]

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
  absent = [k for k in LAST_ROUND_KEYS if k not in last]
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


def resolve_target(runs: list[Run], override: float | None) -> float:
  """`override`, else the runs' `report.target_accuracy`, which must agree."""
  target = override
  if target is None:
    where = {}
    for run in runs:
      where.setdefault(run.config.get(TARGET_KEY), run.path)
    if len(where) > 1 or None in where:
      found = '; '.join(f'{"none" if v is None else v} in {p}' for v, p in where.items())
      raise ReportError(f'{TARGET_KEY} is missing or differs between runs ({found}): '
                        'pass --target_accuracy=F to compare them at one target')
    target = next(iter(where))
  if not 0 < target <= 1:
    raise ReportError(f'target accuracy {target}: must be a fraction in (0, 1], e.g. 0.7')
  return target


def _mean_std(values) -> tuple[float, float | None]:
  """Mean and sample std (None for a single seed: no spread to estimate)."""
  values = [float(v) for v in values]
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def bytes_to_target(run: Run, target: float) -> int | None:
  """Bytes sent when test accuracy first reached `target` (0 if the initial model, round 0,
  did); None if it never did."""
  return next((r['bytes_cumulative'] for r in run.evaluated if r['test_accuracy'] >= target),
              None)


def swing(run: Run) -> float | None:
  """How much the global model jumps about: the mean absolute change of test accuracy
  between consecutive evaluations after training (client drift shows here; the step from
  the initial model, round 0, is learning, not drift); None with one evaluation."""
  accuracy = [e['test_accuracy'] for e in run.trained]
  return float(np.mean(np.abs(np.diff(accuracy)))) if len(accuracy) > 1 else None


def summarize(label: str, runs: list[Run], target: float) -> dict[str, Any]:
  """A group's row of the table (report.csv): seed statistics of its runs' metrics."""
  initial = [r.initial['test_accuracy'] for r in runs if r.initial is not None]
  final_mean, final_std = _mean_std(r.last['test_accuracy'] for r in runs)
  best_mean, best_std = _mean_std(max(e['test_accuracy'] for e in r.trained) for r in runs)
  swings = [s for s in map(swing, runs) if s is not None]
  swing_mean, swing_std = _mean_std(swings) if swings else (None, None)
  reached = [b for b in (bytes_to_target(r, target) for r in runs) if b is not None]
  # float(): a run without noise writes the string 'inf' (JSON has no infinity).
  epsilons = [float(r.last['epsilon']) for r in runs if 'epsilon' in r.last]
  return {
      'group': label,
      'n': len(runs),
      # Round 0's, over the seeds that have one (None: runs made before round 0 was written).
      'initial_accuracy_mean': statistics.fmean(initial) if initial else None,
      'final_accuracy_mean': final_mean,
      'final_accuracy_std': final_std,
      'best_accuracy_mean': best_mean,
      'best_accuracy_std': best_std,
      'swing_mean': swing_mean,
      'swing_std': swing_std,
      'target_accuracy': target,
      'reached_target': len(reached),
      'mib_to_target_mean': statistics.fmean(reached) / callbacks.MIB if reached else None,
      'total_mib_mean': statistics.fmean(r.last['bytes_cumulative'] for r in runs)
                        / callbacks.MIB,
      'trainable_params': runs[0].last['trainable_params'],  # Seeds share the model.
      'epsilon_mean': statistics.fmean(epsilons) if epsilons else None,
      'wall_s_mean': statistics.fmean(r.last['wall_s'] for r in runs),
      'rounds': runs[0].last['round'],
  }


def curve(runs: list[Run], x_key: str):
  """(x, accuracy mean, accuracy std or None) over the rounds every seed evaluated with
  `x_key`, round 0 (the initial model) first where every seed has it; x is the seeds' mean
  (bytes and epsilon vary with the clients sampled)."""
  by_round = [{r['round']: r for r in run.evaluated if x_key in r} for run in runs]
  rounds = sorted(set.intersection(*(set(b) for b in by_round)))
  x = np.mean([[float(b[t][x_key]) for t in rounds] for b in by_round], axis=0)
  accuracy = np.array([[b[t]['test_accuracy'] for t in rounds] for b in by_round])
  return x, accuracy.mean(0), accuracy.std(0, ddof=1) if len(runs) > 1 else None


def _colors(groups) -> list:
  """A color a group, the same in every figure."""
  if len(groups) <= 10:
    return [f'C{i}' for i in range(len(groups))]
  return list(matplotlib.colormaps['turbo'](np.linspace(0, 1, len(groups))))


def _figure(xlabel: str, title: str):
  fig = figure.Figure(figsize=(10, 5), layout='constrained')
  ax = fig.subplots()
  ax.set_xlabel(xlabel)
  ax.set_ylabel('server test accuracy')
  ax.set_title(title)
  ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
  ax.grid(alpha=0.3)
  return fig, ax


def _draw(ax, label, runs, x_key, color, x_scale=1.0):
  """A group's mean line and ±std band over seeds."""
  x, mean, std = curve(runs, x_key)
  ax.plot(x * x_scale, mean, marker='.', label=f'{label} (n={len(runs)})', color=color)
  if std is not None:
    ax.fill_between(x * x_scale, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                    color=color, alpha=0.2, lw=0)


def _save(fig, path: str) -> str:
  labels = fig.axes[0].get_legend_handles_labels()[1]
  if max(map(len, labels), default=0) > 50:  # Long labels beside the plot would squeeze it.
    fig.set_figheight(fig.get_figheight() + 0.2 * len(labels))
    fig.legend(loc='outside lower center', fontsize='small')
  else:
    fig.legend(loc='outside right upper', fontsize='small')
  fig.savefig(path, dpi=120)
  return os.path.basename(path)


def plot_accuracy_vs_round(groups: dict[str, list[Run]], path: str) -> str:
  fig, ax = _figure('round', 'Accuracy by round')
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    _draw(ax, label, runs, 'round', color)
  return _save(fig, path)


def plot_accuracy_vs_communication(groups: dict[str, list[Run]], target: float,
                                   path: str) -> str:
  """The paper's Figure 3: accuracy against cumulative traffic, and the target.

  Traffic spans decades between methods, so the axis is logarithmic; from 0 MiB (round 0:
  the initial model) to the smallest traffic of a round it is linear (symlog), so every
  curve starts at the initial model.
  """
  fig, ax = _figure('MiB sent, up and down, all clients (log scale; linear from 0)',
                    'Accuracy by communication')
  sent = [x for runs in groups.values() for x in curve(runs, 'bytes_cumulative')[0] if x > 0]
  ax.set_xscale('symlog', linthresh=min(sent, default=callbacks.MIB) / callbacks.MIB,
                linscale=0.5)  # The linear stretch: half a decade wide.
  ax.axhline(target, color='black', ls='--', lw=1, label=f'target {100 * target:g}%')
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    _draw(ax, label, runs, 'bytes_cumulative', color, 1 / callbacks.MIB)
  return _save(fig, path)


def plot_accuracy_vs_epsilon(groups: dict[str, list[Run]], path: str) -> str:
  """DP groups against epsilon spent; the others' final accuracy as dotted lines."""
  fig, ax = _figure('epsilon spent', 'Accuracy by privacy budget')
  for (label, runs), color in zip(groups.items(), _colors(groups)):
    if all('epsilon' in r.last for r in runs):
      _draw(ax, label, runs, 'epsilon', color)
    else:
      ax.axhline(statistics.fmean(r.last['test_accuracy'] for r in runs), ls=':',
                 color=color, label=f'{label} (no DP, final)')
  return _save(fig, path)


def plot_partitions(runs: list[Run], path: str) -> str:
  """A row per distinct partition (runs of other methods on the same seed share one): each
  client's examples as a bar stacked by class, and its class mix as fractions."""
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


def markdown(root: str, groups: dict[str, list[Run]], rows: dict[str, dict],
             target: float, figures: list[str]) -> str:
  header = ['group', 'n', 'initial accuracy (%)', 'final accuracy (%)',
            'best accuracy (%)', 'swing (points)',
            f'MiB to {100 * target:g}% (seeds that reached it)', 'total MiB', 'trainable',
            'epsilon', 'wall (s)', 'rounds']
  lines = [f'# Results of {root}', '',
           f'{sum(map(len, groups.values()))} runs in {len(groups)} groups: runs that differ '
           'only in `seed` form a group, named by the config keys that differ between '
           'groups. Mean ± sample std over seeds; initial: round 0, the model before '
           'training (mean); best and swing are over rounds 1 on; swing: mean absolute '
           'change of test accuracy between consecutive evaluations, in points; traffic '
           'counts every client, up and down (the target may be reached at 0 MiB, by the '
           'initial model); epsilon and wall time are the last round\'s.', '',
           '| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
  for label, row in rows.items():
    to_target = (f'{row["mib_to_target_mean"]:.2f}' if row['reached_target'] else '-')
    initial = row['initial_accuracy_mean']
    cells = [label, row['n'], '-' if initial is None else _percent(initial, None),
             _percent(row['final_accuracy_mean'], row['final_accuracy_std']),
             _percent(row['best_accuracy_mean'], row['best_accuracy_std']),
             '-' if row['swing_mean'] is None else _percent(row['swing_mean'], row['swing_std']),
             f'{to_target} ({row["reached_target"]}/{row["n"]})',
             f'{row["total_mib_mean"]:.2f}', f'{row["trainable_params"]:,}',
             '-' if row['epsilon_mean'] is None else f'{row["epsilon_mean"]:.3g}',
             f'{row["wall_s_mean"]:.1f}', row['rounds']]
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  lines += [''] + [f'![{name[:-4]}]({name})' for name in figures]
  lines += ['', '## Runs', ''] + [
      f'- {label}: ' + ', '.join(f'`{os.path.relpath(r.path, root)}`' for r in runs)
      for label, runs in groups.items()]
  return '\n'.join(lines) + '\n'


def write_report(root: str, target_accuracy: float | None = None) -> dict:
  """Writes `report.md`, `report.csv` and the figures of every run under `root`; returns
  the table, {group label: row}: the rows of report.csv."""
  root = os.path.abspath(root)
  runs = [load_run(path) for path in find_runs(root)]
  target = resolve_target(runs, target_accuracy)
  groups = group_runs(runs)
  rows = {label: summarize(label, members, target) for label, members in groups.items()}
  workdir_lib.prepare(root)  # Proves it writable, with a one-line error if not.

  with open(os.path.join(root, 'report.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(next(iter(rows.values()))))
    writer.writeheader()
    writer.writerows(rows.values())
  figures = [plot_accuracy_vs_round(groups, os.path.join(root, 'accuracy_vs_round.png')),
             plot_accuracy_vs_communication(
                 groups, target, os.path.join(root, 'accuracy_vs_communication.png'))]
  epsilon_path = os.path.join(root, EPSILON_FIGURE)
  if any('epsilon' in run.last for run in runs):
    figures.append(plot_accuracy_vs_epsilon(groups, epsilon_path))
  elif os.path.exists(epsilon_path):
    os.remove(epsilon_path)  # Stale: from DP runs no longer here.
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
