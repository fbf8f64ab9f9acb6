"""--mode=report: runs read back from their workdirs into a table of seed statistics and
figures; hand-written runs for the arithmetic, one real run end to end."""
import csv
import io
import json
import statistics
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from fedpeft_jax import errors
from fedpeft_jax.experiment import results
from fedpeft_jax.experiment import train
from tests.conftest import REPO, tiny_config
from tests.test_launch import _one_error_line

MIB = 2**20
ROUNDS = 4  # Evaluated on rounds 0 (the initial model), 2 and 4.
# (config argument, seed) -> test accuracy on rounds 0, 2 and 4. With the default target
# 0.7, bias reaches it on round 4 (seed 0) and 2 (seed 1); bias+lora under DP only with seed
# 1, at round 0 already: its initial model is its best, and not its best after training.
ACCURACY = {('bias', 0): (0.50, 0.60, 0.75), ('bias', 1): (0.50, 0.72, 0.71),
            ('bias+lora,dp=client', 0): (0.50, 0.50, 0.60),
            ('bias+lora,dp=client', 1): (0.72, 0.70, 0.68)}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _config(arg, seed):
  config = tiny_config(arg)
  config.seed, config.fl.rounds, config.fl.eval_every = seed, ROUNDS, 2
  return config


def _records(arg, seed, round_zero=True):
  """metrics.jsonl records as a run writes them; traffic varies by round and seed, as
  Poisson sampling makes it. Without `round_zero`, as runs made before round 0 was written."""
  trainable = 772 if arg == 'bias' else 2820
  records, sent = [], 0
  if round_zero:
    records.append({'round': 0, 'bytes_cumulative': 0, 'trainable_params': trainable,
                    'test_accuracy': ACCURACY[arg, seed][0],
                    **({'epsilon': 0.0} if 'dp=client' in arg else {}), 'wall_s': 0.5})
  for r in range(1, ROUNDS + 1):
    sent += 4 * trainable * 2 * (3 + (r + seed) % 3)
    record = {'round': r, 'train_loss': 1.0 / r, 'bytes_cumulative': sent,
              'trainable_params': trainable, 'wall_s': 1.5 * r + seed}
    if r % 2 == 0:
      record['test_accuracy'] = ACCURACY[arg, seed][r // 2]
      if 'dp=client' in arg:
        record['epsilon'] = 0.8 * r + 0.1 * seed
    records.append(record)
  return records


def _write_run(folder, config, records):
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(config.to_dict()))
  (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


@pytest.fixture
def sweep_root(tmp_path):
  """Two groups of two seeds, at different depths, as a sweep and hand-made runs mix."""
  for (arg, seed) in ACCURACY:
    depth = 'nested/deeper/' if seed else ''
    _write_run(tmp_path / f'{depth}{arg.replace(",", "_")}_seed{seed}', _config(arg, seed),
               _records(arg, seed))
  return tmp_path


def _metrics(root):
  """Every run's records, by (config argument, seed), read back from the files."""
  runs = {}
  for path in root.rglob('metrics.jsonl'):
    config = json.loads((path.parent / 'config.json').read_text())
    arg = config['peft']['method'] + (',dp=client' if config['dp']['mode'] == 'client' else '')
    runs[arg, config['seed']] = [json.loads(l) for l in path.read_text().splitlines()]
  return runs


def test_the_table_is_the_seed_statistics_of_the_metrics_files(sweep_root):
  rows = results.write_report(str(sweep_root))
  metrics = _metrics(sweep_root)
  assert list(rows) == ['method=bias+lora, dp=client', 'method=bias, dp=none']
  for label, arg in (('method=bias, dp=none', 'bias'),
                     ('method=bias+lora, dp=client', 'bias+lora,dp=client')):
    runs = [metrics[arg, seed] for seed in (0, 1)]
    evaluated = [[r for r in run if 'test_accuracy' in r] for run in runs]
    assert [[r['round'] for r in e] for e in evaluated] == [[0, 2, 4]] * 2
    trained = [e[1:] for e in evaluated]  # Best and swing: of the trained model.
    finals = [run[-1]['test_accuracy'] for run in runs]
    bests = [max(r['test_accuracy'] for r in e) for e in trained]
    swings = [statistics.mean(abs(b['test_accuracy'] - a['test_accuracy'])
                              for a, b in zip(e, e[1:])) for e in trained]
    # The target counts from round 0: reached at 0 MiB if the initial model reaches it.
    reached = [next((r['bytes_cumulative'] for r in e if r['test_accuracy'] >= 0.7), None)
               for e in evaluated]
    reached = [b for b in reached if b is not None]
    row = rows[label]
    assert row['n'] == 2 and row['rounds'] == ROUNDS and row['target_accuracy'] == 0.7
    assert row['initial_accuracy_mean'] == pytest.approx(
        statistics.mean(e[0]['test_accuracy'] for e in evaluated))
    assert row['final_accuracy_mean'] == pytest.approx(statistics.mean(finals))
    assert row['final_accuracy_std'] == pytest.approx(statistics.stdev(finals))
    assert row['best_accuracy_mean'] == pytest.approx(statistics.mean(bests))
    assert row['best_accuracy_std'] == pytest.approx(statistics.stdev(bests))
    assert row['swing_mean'] == pytest.approx(statistics.mean(swings))
    assert row['swing_std'] == pytest.approx(statistics.stdev(swings))
    assert row['reached_target'] == len(reached)
    assert row['mib_to_target_mean'] == pytest.approx(statistics.mean(reached) / MIB)
    assert row['total_mib_mean'] == pytest.approx(
        statistics.mean(run[-1]['bytes_cumulative'] for run in runs) / MIB)
    assert row['trainable_params'] == runs[0][-1]['trainable_params']
    assert row['wall_s_mean'] == pytest.approx(statistics.mean(run[-1]['wall_s'] for run in runs))
  # The hand-picked accuracies: both bias seeds reach 70% (rounds 4 and 2), one DP seed does.
  assert rows['method=bias, dp=none']['reached_target'] == 2
  assert rows['method=bias, dp=none']['swing_mean'] == pytest.approx((0.15 + 0.01) / 2)
  dp = rows['method=bias+lora, dp=client']
  assert dp['reached_target'] == 1 and dp['mib_to_target_mean'] == 0  # Seed 1's round 0.
  assert dp['best_accuracy_mean'] == pytest.approx((0.60 + 0.70) / 2)  # Not 0.72: round 0.
  assert dp['swing_mean'] == pytest.approx((0.10 + 0.02) / 2)
  assert dp['initial_accuracy_mean'] == pytest.approx((0.50 + 0.72) / 2)
  assert rows['method=bias+lora, dp=client']['epsilon_mean'] == pytest.approx(
      statistics.mean([3.2, 3.3]))
  assert rows['method=bias, dp=none']['epsilon_mean'] is None

  with open(sweep_root / 'report.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['group'] for r in table] == list(rows)
  for written, row in zip(table, rows.values()):
    assert written == {k: '' if v is None else str(v) for k, v in row.items()}
  markdown = (sweep_root / 'report.md').read_text()
  bias = rows['method=bias, dp=none']
  assert (f"| method=bias, dp=none | 2 | 50.00 | {100 * bias['final_accuracy_mean']:.2f} ± "
          f"{100 * bias['final_accuracy_std']:.2f} |") in markdown
  assert f"| {100 * bias['swing_mean']:.2f} ± {100 * bias['swing_std']:.2f} |" in markdown
  assert f"{bias['mib_to_target_mean']:.2f} (2/2)" in markdown
  assert '![accuracy_vs_epsilon](accuracy_vs_epsilon.png)' in markdown
  assert '`nested/deeper/bias_seed1`' in markdown


def test_curves_start_at_the_initial_model_where_every_seed_has_round_zero(tmp_path,
                                                                        monkeypatch):
  """Round 0: x 0 (round, MiB, epsilon) and the initial accuracy; a seed without one (a run
  made before round 0 was written) starts the group's curve at the first common round."""
  for seed in (0, 1):
    _write_run(tmp_path / f'dp_{seed}', _config('bias+lora,dp=client', seed),
               _records('bias+lora,dp=client', seed))
  runs = [results.load_run(str(tmp_path / f'dp_{seed}')) for seed in (0, 1)]
  initial = [ACCURACY['bias+lora,dp=client', seed][0] for seed in (0, 1)]
  for key in ('round', 'bytes_cumulative', 'epsilon'):
    x, mean, std = results.curve(runs, key)
    assert x[0] == 0 and mean[0] == pytest.approx(statistics.mean(initial))
    assert std[0] == pytest.approx(statistics.stdev(initial)) and len(x) == 3
  sent, _, _ = results.curve(runs, 'bytes_cumulative')
  assert list(sent[1:]) == [statistics.mean(r.metrics[t]['bytes_cumulative'] for r in runs)
                         for t in (2, 4)]
  _write_run(tmp_path / 'old', _config('bias+lora,dp=client', 2),
             _records('bias+lora,dp=client', 1, round_zero=False))
  old = results.load_run(str(tmp_path / 'old'))
  assert old.initial is None and [r['round'] for r in old.trained] == [2, 4]
  x, mean, _ = results.curve(runs + [old], 'round')
  assert list(x) == [2, 4]
  row = results.summarize('g', runs + [old], 0.7)
  assert row['initial_accuracy_mean'] == pytest.approx(statistics.mean(initial))
  assert results.summarize('g', [old], 0.7)['initial_accuracy_mean'] is None
  # The communication figure draws 0 MiB (a log axis could not), linear up to the
  # smallest traffic of a round.
  drawn = []
  monkeypatch.setattr(results, '_save', lambda fig, path: drawn.append(fig))
  results.plot_accuracy_vs_communication({'g': runs}, 0.7, str(tmp_path / 'c.png'))
  ax = drawn[0].axes[0]
  line = [l for l in ax.get_lines() if l.get_label().startswith('g ')][0]
  assert ax.get_xscale() == 'symlog' and line.get_xdata()[0] == 0
  assert ax.xaxis.get_transform().linthresh == pytest.approx(sent[1] / MIB)


def test_the_figures_are_pngs_and_epsilon_only_under_dp(sweep_root, tmp_path_factory):
  results.write_report(str(sweep_root))
  for name in ('accuracy_vs_round', 'accuracy_vs_communication', 'accuracy_vs_epsilon'):
    data = (sweep_root / f'{name}.png').read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name

  without_dp = tmp_path_factory.mktemp('without_dp')
  for seed in (0, 1):
    _write_run(without_dp / f'bias_{seed}', _config('bias', seed), _records('bias', seed))
  rows = results.write_report(str(without_dp))
  assert list(rows) == ['method=bias']  # One group: named by its method.
  assert (without_dp / 'accuracy_vs_communication.png').exists()
  assert not (without_dp / 'accuracy_vs_epsilon.png').exists()

  # Labels too long to stand beside the plot go below it, and the figure grows to hold them.
  runs = [results.load_run(str(without_dp / f'bias_{seed}')) for seed in (0, 1)]
  short = results.plot_accuracy_vs_round({'bias': runs}, str(without_dp / 'short.png'))
  long = results.plot_accuracy_vs_round({'x' * 60: runs, 'y' * 60: runs},
                                        str(without_dp / 'long.png'))
  with PIL.Image.open(without_dp / short) as a, PIL.Image.open(without_dp / long) as b:
    assert b.height > a.height and b.width == a.width


def _partition(seed, sizes):
  """partition.json as a run writes it: two classes, the first client all of class 0."""
  return {'method': 'dirichlet', 'args': {'seed': seed, 'data.alpha': 0.1,
                                          'data.min_client_size': 10},
          'class_names': ['0', '1'],
          'clients': [{'size': n, 'label_histogram': [n, 0] if i == 0 else [n - 5, 5]}
                      for i, n in enumerate(sizes)]}


def test_the_partitions_are_drawn_once_each_and_runs_without_one_are_left_out(sweep_root):
  results.write_report(str(sweep_root))  # Runs made before partition.json: no figure.
  assert not (sweep_root / 'partition.png').exists()
  assert 'partition.png' not in (sweep_root / 'report.md').read_text()
  # Two methods share seed 0's partition; seed 1's differs; one run has none.
  for run, content in (('bias_seed0', _partition(0, [40, 12, 30])),
                       ('bias+lora_dp=client_seed0', _partition(0, [40, 12, 30])),
                       ('nested/deeper/bias_seed1', _partition(1, [20, 50, 11]))):
    (sweep_root / run / 'partition.json').write_text(json.dumps(content))
  results.write_report(str(sweep_root))
  data = (sweep_root / 'partition.png').read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  # A row of 3 inches at 100 dpi per distinct partition, 1 inch for the margins.
  assert PIL.Image.open(io.BytesIO(data)).size == (1400, 100 * (1 + 3 * 2))
  assert '![partition](partition.png)' in (sweep_root / 'report.md').read_text()
  for partition_file in sweep_root.rglob('partition.json'):
    partition_file.unlink()
  results.write_report(str(sweep_root))
  assert not (sweep_root / 'partition.png').exists()  # Stale: its runs have none now.


def test_dp_runs_partitions_without_per_client_data_are_left_out_of_the_figure(sweep_root):
  """Under DP partition.json holds no client sizes or histograms: the report still
  runs, draws only the partitions that have them, and no figure if none has."""
  dp_partition = {key: value for key, value in _partition(0, [40, 12, 30]).items()
                  if key != 'clients'} | {'num_clients': 3}
  for run in ('bias+lora_dp=client_seed0', 'nested/deeper/bias+lora_dp=client_seed1'):
    (sweep_root / run / 'partition.json').write_text(json.dumps(dp_partition))
  results.write_report(str(sweep_root))
  assert not (sweep_root / 'partition.png').exists()
  assert 'partition.png' not in (sweep_root / 'report.md').read_text()
  (sweep_root / 'bias_seed0' / 'partition.json').write_text(json.dumps(_partition(0, [9, 8])))
  results.write_report(str(sweep_root))
  data = (sweep_root / 'partition.png').read_bytes()
  # One row: the one partition with clients (3 inches at 100 dpi, 1 inch of margins).
  assert PIL.Image.open(io.BytesIO(data)).size == (1400, 100 * (1 + 3 * 1))


def test_a_single_seed_has_no_std(tmp_path):
  _write_run(tmp_path / 'run', _config('bias', 0), _records('bias', 0))
  row = results.write_report(str(tmp_path))['method=bias']
  assert row['n'] == 1 and row['final_accuracy_std'] is None
  assert row['final_accuracy_mean'] == 0.75


def test_a_dp_run_without_noise_reports_infinite_epsilon(tmp_path):
  records = _records('bias+lora,dp=client', 0)
  for r in records[2::2]:  # Rounds 2 and 4; round 0 spent nothing.
    r['epsilon'] = 'inf'  # As a run writes it: JSON has no infinity.
  _write_run(tmp_path / 'run', _config('bias+lora,dp=client', 0), records)
  row = results.write_report(str(tmp_path))['method=bias+lora']
  assert row['epsilon_mean'] == float('inf')
  assert (tmp_path / 'accuracy_vs_epsilon.png').exists()


def test_labels_name_the_paper_axes_that_differ_not_what_follows_from_them(tmp_path):
  # bias and lora differ in their learning rate too; participation in clients_per_round.
  for arg in ('bias', 'lora', 'lora,participation=1.0'):
    config = _config(arg, 0)
    _write_run(tmp_path / arg.replace(',', '_'), config, _records('bias', 0))
  assert list(results.write_report(str(tmp_path))) == [
      'method=bias, clients_per_round=4', 'method=lora, clients_per_round=4',
      'method=lora, clients_per_round=8']


def test_the_target_comes_from_the_configs_or_the_argument(sweep_root):
  assert results.write_report(str(sweep_root), 0.74)['method=bias, dp=none'][
      'reached_target'] == 1
  other = _config('bias', 2)
  other.report.target_accuracy = 0.8
  _write_run(sweep_root / 'bias_seed2', other, _records('bias', 0))
  with pytest.raises(results.ReportError,
                     match=r'report.target_accuracy is missing or differs .*0.7 in .*; 0.8 in '
                           r'.*bias_seed2\): pass --target_accuracy'):
    results.write_report(str(sweep_root))
  rows = results.write_report(str(sweep_root), 0.7)
  assert rows['method=bias, dp=none']['n'] == 3
  with pytest.raises(results.ReportError, match='target accuracy 70: must be a fraction'):
    results.write_report(str(sweep_root), 70)


def test_runs_that_cannot_be_compared_are_refused_naming_the_folder(sweep_root):
  run = sweep_root / 'bias_seed0'
  metrics = (run / 'metrics.jsonl').read_text()
  (run / 'metrics.jsonl').write_text(metrics.rsplit('\n', 2)[0] + '\n')  # Round 3 of 4.
  with pytest.raises(results.ReportError, match=f'{run}: unfinished, round 3 of fl.rounds=4'):
    results.write_report(str(sweep_root))
  _write_run(sweep_root / 'copy', _config('bias', 1), _records('bias', 1))
  (run / 'metrics.jsonl').write_text(metrics)
  with pytest.raises(results.ReportError, match='are the same run .*same config and seed'):
    results.write_report(str(sweep_root))


def _report(root, *flags):
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), '--mode=report',
                         f'--workdir={root}', *flags], capture_output=True, text=True)


def test_a_real_run_reported_from_the_command_line(tmp_path):
  config = tiny_config('bias')
  config.fl.rounds = 2
  history = train.train(config, str(tmp_path / 'sweep' / 'bias'))
  result = _report(tmp_path / 'sweep')
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| method=bias | 1 |' in result.stdout and 'report.md' in result.stdout
  with open(tmp_path / 'sweep' / 'report.csv') as f:
    (row,) = csv.DictReader(f)
  assert float(row['final_accuracy_mean']) == history[-1]['test_accuracy']
  assert [r['round'] for r in history] == [0, 1, 2]
  assert float(row['initial_accuracy_mean']) == history[0]['test_accuracy']
  assert float(row['best_accuracy_mean']) == max(r['test_accuracy'] for r in history[1:])
  assert float(row['total_mib_mean']) == history[-1]['bytes_cumulative'] / MIB
  assert int(row['trainable_params']) == 772 and int(row['rounds']) == 2
  assert float(row['target_accuracy']) == 0.7 and row['epsilon_mean'] == ''
  for name in ('accuracy_vs_round', 'accuracy_vs_communication', 'partition'):
    assert (tmp_path / 'sweep' / f'{name}.png').read_bytes().startswith(PNG_SIGNATURE)

  # The refusals, in process (launch turns any UserError into its one line and exit 2:
  # tests/test_launch.py): three fewer interpreter starts.
  def refused(root, needle, target=None):
    with pytest.raises(errors.UserError) as raised:
      results.write_report(str(root), target, None)
    assert needle in str(raised.value) and '\n' not in str(raised.value), str(raised.value)

  (tmp_path / 'empty').mkdir()
  refused(tmp_path / 'empty', f'--workdir={tmp_path / "empty"}: no runs in it')

  metrics = tmp_path / 'sweep' / 'bias' / 'metrics.jsonl'
  lines = metrics.read_text().splitlines()
  last = json.loads(lines[-1])
  del last['test_accuracy']
  metrics.write_text('\n'.join(lines[:-1] + [json.dumps(last)]) + '\n')
  refused(tmp_path / 'sweep', f'{metrics}: the last round (2) has no test_accuracy')

  (tmp_path / 'sweep' / 'bias' / 'config.json').unlink()
  refused(tmp_path / 'sweep', f'{tmp_path / "sweep" / "bias"}: no config.json', 0.5)


def test_every_other_mode_needs_a_config(tmp_path):
  result = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--mode=masks',
                           f'--workdir={tmp_path}'], capture_output=True, text=True)
  assert _one_error_line(result, '') == 'error: --mode=masks needs --config=FILE'


# Text runs (the causal_lm task): reported in test perplexity, lower better.
# (method, seed) -> test perplexity on rounds 0, 2 and 4, and next-token accuracy, which
# must not steer anything: its best is another round than perplexity's.
PERPLEXITY = {('lora', 0): (300.0, 120.0, 90.0), ('lora', 1): (300.0, 80.0, 95.0),
              ('norm', 0): (300.0, 250.0, 210.0), ('norm', 1): (310.0, 240.0, 260.0)}
NEXT_TOKEN_ACCURACY = (0.10, 0.30, 0.20)


def _text_config(method, seed, target=None):
  config = _config(method, seed)
  config.model.family, config.data.source = 'llama', 'text'
  config.report.target_perplexity = target
  return config


def _text_records(method, seed):
  """metrics.jsonl as a causal_lm run writes it: test perplexity, loss and next-token
  accuracy on rounds 0, 2 and 4."""
  records = _records('bias', seed)
  for record in records:
    if 'test_accuracy' in record:
      ppl = PERPLEXITY[method, seed][record['round'] // 2]
      record.update(test_perplexity=ppl, test_loss=float(np.log(ppl)),
                    test_accuracy=NEXT_TOKEN_ACCURACY[record['round'] // 2])
  return records


@pytest.fixture
def text_root(tmp_path):
  for method, seed in PERPLEXITY:
    _write_run(tmp_path / f'{method}_seed{seed}', _text_config(method, seed, target=100.0),
               _text_records(method, seed))
  return tmp_path


def test_text_runs_are_reported_in_perplexity_with_the_lowest_as_best(text_root):
  rows = results.write_report(str(text_root))
  metrics = _metrics(text_root)
  assert list(rows) == ['method=lora', 'method=norm']
  for method in ('lora', 'norm'):
    runs = [metrics[method, seed] for seed in (0, 1)]
    ppl = np.array([[r['test_perplexity'] for r in run if 'test_perplexity' in r]
                    for run in runs])  # [seed, evaluation]: rounds 0, 2, 4.
    best = ppl[:, 1:].min(1)
    swings = np.abs(np.diff(ppl[:, 1:], axis=1)).mean(1)
    row = rows[f'method={method}']
    for name, values in (('initial', ppl[:, 0]), ('final', ppl[:, -1]), ('best', best)):
      assert row[f'{name}_perplexity_mean'] == pytest.approx(values.mean()), name
      assert row[f'{name}_perplexity_std'] == pytest.approx(values.std(ddof=1)), name
    assert row['swing_mean'] == pytest.approx(swings.mean())
    assert row['swing_std'] == pytest.approx(swings.std(ddof=1))
    sent = np.array([[r['bytes_cumulative'] for r in run if 'test_perplexity' in r]
                     for run in runs])
    reached = [s[p <= 100][0] for s, p in zip(sent, ppl) if (p <= 100).any()]
    assert row['target_perplexity'] == 100 and row['reached_target'] == len(reached)
    assert row['mib_to_target_mean'] == (np.mean(reached) / MIB if reached else None)
    assert 'best_accuracy_mean' not in row and 'target_accuracy' not in row
  lora, norm = rows['method=lora'], rows['method=norm']
  # By hand: lora's best are 90 (round 4) and 80 (round 2), not accuracy's round 2 for both.
  assert lora['best_perplexity_mean'] == 85 and lora['reached_target'] == 2
  assert norm['reached_target'] == 0 and norm['mib_to_target_mean'] is None

  with open(text_root / 'report.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['group'] for r in table] == list(rows)
  for written, row in zip(table, rows.values()):
    assert written == {k: '' if v is None else str(v) for k, v in row.items()}
  markdown = (text_root / 'report.md').read_text()
  assert ('| initial perplexity | final perplexity | best (lowest) perplexity | '
          'swing (perplexity) | MiB to perplexity 100 (seeds that reached it) |') in markdown
  assert (f"| method=lora | 2 | 300.00 ± 0.00 | 92.50 ± 3.54 | 85.00 ± 7.07 | "
          f"{lora['swing_mean']:.2f} ± {lora['swing_std']:.2f} | "
          f"{lora['mib_to_target_mean']:.2f} (2/2) |") in markdown
  assert '| - (0/2) |' in markdown and 'accuracy' not in markdown
  for name in ('perplexity_vs_round', 'perplexity_vs_communication'):
    assert f'![{name}]({name}.png)' in markdown
    data = (text_root / f'{name}.png').read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
  assert not list(text_root.glob('accuracy_vs_*.png'))


def test_text_figures_draw_perplexity_from_round_zero_on_a_log_axis(text_root, monkeypatch):
  drawn = []
  monkeypatch.setattr(results, '_save', lambda fig, path: drawn.append(fig) or path)
  results.write_report(str(text_root))
  by_round, by_traffic = (fig.axes[0] for fig in drawn)
  runs = _metrics(text_root)
  for ax, x_key in ((by_round, 'round'), (by_traffic, 'bytes_cumulative')):
    assert ax.get_yscale() == 'log' and 'perplexity' in ax.get_ylabel()
    line = [l for l in ax.get_lines() if l.get_label() == 'method=lora (n=2)'][0]
    evaluated = [[r for r in runs['lora', seed] if 'test_perplexity' in r] for seed in (0, 1)]
    x = np.mean([[r[x_key] for r in e] for e in evaluated], axis=0)
    y = np.mean([[r['test_perplexity'] for r in e] for e in evaluated], axis=0)
    scale = 1 / MIB if x_key == 'bytes_cumulative' else 1
    np.testing.assert_allclose(line.get_xdata(), x * scale)
    np.testing.assert_allclose(line.get_ydata(), y)
    assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == 300
  target = [l for l in by_traffic.get_lines() if l.get_label() == 'target perplexity 100']
  assert target and list(target[0].get_ydata()) == [100, 100]


def test_text_runs_without_a_target_have_no_target_column(tmp_path):
  for seed in (0, 1):
    _write_run(tmp_path / f'lora_{seed}', _text_config('lora', seed),
               _text_records('lora', seed))
  row = results.write_report(str(tmp_path))['method=lora']
  assert row['target_perplexity'] is None and row['reached_target'] is None
  assert row['mib_to_target_mean'] is None
  markdown = (tmp_path / 'report.md').read_text()
  assert 'MiB to' not in markdown and 'report.target_perplexity is unset' in markdown
  header = next(l for l in markdown.splitlines() if l.startswith('| group'))
  row_line = next(l for l in markdown.splitlines() if l.startswith('| method=lora'))
  assert header.count('|') == row_line.count('|')
  # A target given to the report function instead of the configs.
  assert results.write_report(str(tmp_path), target_perplexity=85)['method=lora'][
      'reached_target'] == 1


def test_text_reports_refuse_mixed_roots_other_targets_and_a_last_round_without_perplexity(
    text_root):
  with pytest.raises(results.ReportError, match=r'^--target_accuracy=0.7: the runs under .* '
                     r'are text runs, reported in perplexity; their target is '
                     r'report.target_perplexity'):
    results.write_report(str(text_root), 0.7)
  with pytest.raises(results.ReportError, match='target_perplexity=0.5: a perplexity is at '
                     'least 1'):
    results.write_report(str(text_root), target_perplexity=0.5)
  _write_run(text_root / 'lora_seed2', _text_config('lora', 2, target=50.0),
             _text_records('lora', 1))
  with pytest.raises(results.ReportError, match=r'report.target_perplexity is missing or '
                     r'differs between runs \(100.0 in .*; 50.0 in .*lora_seed2\)'):
    results.write_report(str(text_root))
  (text_root / 'lora_seed2' / 'config.json').unlink()
  (text_root / 'lora_seed2' / 'metrics.jsonl').unlink()
  (text_root / 'lora_seed2').rmdir()
  _write_run(text_root / 'images' / 'bias', _config('bias', 0), _records('bias', 0))
  with pytest.raises(results.ReportError) as e:
    results.write_report(str(text_root))
  assert str(e.value) == (
      f'--workdir={text_root} mixes runs reported in accuracy (e.g. {text_root}/images/bias) '
      f'and text runs reported in perplexity (e.g. {text_root}/lora_seed0): report each '
      'kind from a folder of its own')
  run = text_root / 'lora_seed0'
  records = _text_records('lora', 0)
  del records[-1]['test_perplexity']
  (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  with pytest.raises(results.ReportError, match=f'{run}/metrics.jsonl: the last round \\(4\\) '
                     'has no test_perplexity'):
    results.write_report(str(run))


@pytest.mark.cli
def test_the_target_perplexity_flag_reaches_the_text_report(text_root):
  result = _report(text_root, '--target_perplexity=85')
  assert result.returncode == 0, result.stderr
  with open(text_root / 'report.csv') as f:
    rows = {r['group']: r for r in csv.DictReader(f)}
  # lora's seeds reach 85 or below once (by hand: 90 and 80 are their best); norm's never.
  assert rows['method=lora']['target_perplexity'] == '85.0'
  assert rows['method=lora']['reached_target'] == '1'
  assert rows['method=norm']['reached_target'] == '0'


# LoRA aggregation rules: runs that write lora_aggregation_error (rounds 1 on; null in a
# round that aggregated nobody). (rule, client ranks, seed) -> the errors of rounds 1..4.
AGGREGATION_ERRORS = {('fedit', '', 0): (0.30, 0.20, None, 0.10),
                      ('fedit', '', 1): (0.25, 0.15, 0.12, 0.08),
                      ('fedex', '', 0): (2e-7, 0.0, 1e-7, 3e-7),
                      ('fedex', '', 1): (1e-7, 1e-7, 0.0, 2e-7),
                      ('fedit', '2,4,8,16', 0): (0.5, 0.4, 0.35, 0.3)}


def _rule_run(root, rule, ranks, seed):
  config = _text_config('lora', seed)
  config.peft.lora_aggregation, config.peft.lora_client_ranks = rule, ranks
  if ranks:
    config.peft.lora_rank = 16
  records = _text_records('lora', seed)
  for record in records[1:]:
    record['lora_aggregation_error'] = AGGREGATION_ERRORS[rule, ranks, seed][
        record['round'] - 1]
  _write_run(root / f'{rule}_{ranks.replace(",", "-")}_seed{seed}', config, records)


@pytest.fixture
def rules_root(tmp_path):
  """Three groups of LoRA rules (one at mixed ranks, one seed) and a method without LoRA,
  whose runs have no aggregation error."""
  for rule, ranks, seed in AGGREGATION_ERRORS:
    _rule_run(tmp_path, rule, ranks, seed)
  for seed in (0, 1):
    _write_run(tmp_path / f'norm_seed{seed}', _text_config('norm', seed),
               _text_records('norm', seed))
  return tmp_path


def test_runs_of_lora_rules_report_their_aggregation_error(rules_root, monkeypatch):
  drawn = []
  save = results._save
  monkeypatch.setattr(results, '_save', lambda fig, path: drawn.append(fig) or save(fig, path))
  rows = results.write_report(str(rules_root))
  labels = {('fedex', ''): 'method=lora, lora_aggregation=fedex, lora_client_ranks=',
            ('fedit', ''): 'method=lora, lora_aggregation=fedit, lora_client_ranks=',
            ('fedit', '2,4,8,16'):
                'method=lora, lora_aggregation=fedit, lora_client_ranks=2,4,8,16'}
  norm = 'method=norm, lora_aggregation=fedit, lora_client_ranks='
  assert sorted(rows) == sorted([*labels.values(), norm])  # lora_rank follows: left out.
  per_run = {}  # (rule, ranks) -> each seed's mean over its rounds with an error.
  for (rule, ranks, seed), values in AGGREGATION_ERRORS.items():
    per_run.setdefault((rule, ranks), []).append(
        np.mean(np.array([v for v in values if v is not None])))
  for key, label in labels.items():
    row, means = rows[label], np.array(per_run[key])
    assert row['aggregation_error_mean'] == pytest.approx(means.mean(), rel=1e-12)
    std = None if len(means) == 1 else pytest.approx(means.std(ddof=1), rel=1e-12)
    assert row['aggregation_error_std'] == std
    assert list(row).index('aggregation_error_mean') == list(row).index('total_mib_mean') + 1
  assert rows['method=lora, lora_aggregation=fedit, lora_client_ranks=']['aggregation_error_mean'] \
      == pytest.approx((0.2 + 0.15) / 2)  # By hand: seed 0's null round left out.
  assert rows[norm]['aggregation_error_mean'] is None
  assert rows[norm]['aggregation_error_std'] is None

  with open(rules_root / 'report.csv') as f:
    table = list(csv.DictReader(f))
  for written, row in zip(table, rows.values()):
    assert written == {k: '' if v is None else str(v) for k, v in row.items()}
  markdown = (rules_root / 'report.md').read_text()
  header = next(l for l in markdown.splitlines() if l.startswith('| group'))
  assert '| total MiB | aggregation error | trainable |' in header
  fedex = rows[labels['fedex', '']]
  for label, cell in ((labels['fedex', ''], f"{fedex['aggregation_error_mean']:.3g} ± "
                                            f"{fedex['aggregation_error_std']:.2g}"),
                      (labels['fedit', '2,4,8,16'], '0.388'), (norm, '-')):
    line = next(l for l in markdown.splitlines() if l.startswith(f'| {label} |'))
    assert line.count('|') == header.count('|')
    assert line.split(' | ')[header.split(' | ').index('aggregation error')] == cell, label
  assert '![aggregation_error_vs_round](aggregation_error_vs_round.png)' in markdown
  data = (rules_root / 'aggregation_error_vs_round.png').read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

  ax = drawn[-1].axes[0]
  assert ax.get_yscale() == 'symlog'
  lines = {l.get_label(): l for l in ax.get_lines()}
  assert not any(name.startswith('method=norm') for name in lines)
  fedit = lines[f"{labels['fedit', '']} (n=2)"]
  # Rounds both seeds have: round 3 is null in seed 0.
  np.testing.assert_array_equal(fedit.get_xdata(), [1, 2, 4])
  np.testing.assert_allclose(fedit.get_ydata(), [(0.30 + 0.25) / 2, (0.20 + 0.15) / 2,
                                                 (0.10 + 0.08) / 2])

  # Under client DP the error is a diagnostic: read from there.
  records = [{'round': 0}, {'round': 1, 'diagnostics': {'lora_aggregation_error': 0.4}},
             {'round': 2, 'diagnostics': {'lora_aggregation_error': 0.2}}]
  assert results.mean_aggregation_error(results.Run('x', {}, records)) == pytest.approx(0.3)

  # Without such runs the column and the figure are gone (the figure as stale).
  for path in rules_root.glob('fed*'):
    for f in path.iterdir():
      f.unlink()
    path.rmdir()
  row = results.write_report(str(rules_root))['method=norm']
  assert 'aggregation_error_mean' not in row
  assert 'aggregation error' not in (rules_root / 'report.md').read_text()
  assert not (rules_root / 'aggregation_error_vs_round.png').exists()
