"""The command line: runs that survive kills, and every user mistake as one line, exit 2."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import OPTIMIZED_XLA_ENV, PCAM, REPO, TI4_CHECKPOINT, launch, needs

LONG_RUN = ['--config.fl.rounds=60', '--config.checkpoint.every=1', '--config.fl.eval_every=20',
            '--config.checkpoint.keep=3']


def _checkpointed_rounds(workdir):
  path = workdir / 'checkpoints'
  return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if path.exists() else []


def _last_sha(workdir):
  return json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])[
      'trainable_sha256']


def _wait_for_checkpoint(process, workdir, round_index):
  deadline = time.time() + 120
  while not any(r >= round_index for r in _checkpointed_rounds(workdir)):
    assert process.poll() is None and time.time() < deadline, 'run ended before the signal'
    time.sleep(0.02)


def _one_error_line(result, needle):
  assert result.returncode == 2, (needle, result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
  assert needle in lines[0], lines[0]
  return lines[0]


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
  straight = launch(tmp_path / 'straight', *LONG_RUN)
  assert straight.returncode == 0, straight.stderr[-2000:]

  victim = launch(tmp_path / 'killed', *LONG_RUN, wait=False)
  _wait_for_checkpoint(victim, tmp_path / 'killed', 3)
  # Paused, it cannot finish while a slow machine starts the second run below.
  victim.send_signal(signal.SIGSTOP)
  # While it lives, its workdir is locked: a second run is refused at once.
  second = launch(tmp_path / 'killed', *LONG_RUN)
  _one_error_line(second, 'in use by a live run')
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = max(_checkpointed_rounds(tmp_path / 'killed'))
  assert killed_at < 60 and not (tmp_path / 'killed' / 'trainable.npz').exists()

  resumed = launch(tmp_path / 'killed', *LONG_RUN)  # The dead run's lock is gone.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming from round' in resumed.stdout
  assert _last_sha(tmp_path / 'killed') == _last_sha(tmp_path / 'straight')
  lines = (tmp_path / 'killed' / 'metrics.jsonl').read_text().splitlines()
  # Round 0 (the initial model) once, then every round: no duplicates.
  assert [json.loads(l)['round'] for l in lines] == list(range(0, 61))
  exported = np.load(tmp_path / 'killed' / 'trainable.npz')
  assert 'head/kernel' in exported.files and 'Transformer/encoder_norm/bias' in exported.files
  assert _checkpointed_rounds(tmp_path / 'killed') == [58, 59, 60]  # checkpoint.keep=3

  again = launch(tmp_path / 'killed', *LONG_RUN)  # Finished: says so, loads nothing.
  assert again.returncode == 0 and 'holds a finished run (60 rounds)' in again.stdout
  assert 'loading' not in again.stdout
  assert len((tmp_path / 'killed' / 'metrics.jsonl').read_text().splitlines()) == 61


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_to_resume_from(tmp_path):
  run = launch(tmp_path, *LONG_RUN, wait=False)
  _wait_for_checkpoint(run, tmp_path, 2)
  run.send_signal(signal.SIGINT)
  _, stderr = run.communicate(timeout=180)
  assert run.returncode == 130 and 'Traceback' not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('interrupted: the last checkpoint is round ')
  assert f'{tmp_path}/checkpoints' in lines[0] and 'same command to resume' in lines[0]
  step = int(lines[0].split('round ')[1].split()[0])
  assert step == max(_checkpointed_rounds(tmp_path))


def test_a_workdir_of_another_config_is_refused_unless_forced(tmp_path):
  first = launch(tmp_path, '--config.fl.rounds=2')
  assert first.returncode == 0, first.stderr[-2000:]
  other = launch(tmp_path, '--config.fl.rounds=4', '--config.fl.num_clients=16',
                  '--config.peft.method=head')
  assert other.returncode == 2
  assert 'fl.num_clients: checkpoint 8 vs now 16' in other.stderr
  assert "peft.method: checkpoint 'bias' vs now 'head'" in other.stderr
  assert 'Traceback' not in other.stderr
  longer = launch(tmp_path, '--config.fl.rounds=4')  # More rounds: a plain resume.
  assert longer.returncode == 0 and 'resuming from round 2' in longer.stdout


def test_all_clients_nonfinite_stops_the_run_keeping_the_last_checkpoint(tmp_path):
  ok = launch(tmp_path, '--config.fl.rounds=2')
  assert ok.returncode == 0
  # Resume with a learning rate that overflows: every update is Inf or NaN.
  bad = launch(tmp_path, '--config.fl.rounds=4', '--config.optim.lr=1e38',
                '--config.checkpoint.force=True')
  assert bad.returncode == 1
  assert 'NaN or Inf' in bad.stderr and 'Traceback' not in bad.stderr
  assert _checkpointed_rounds(tmp_path) == [2]


def _text_file(tmp_path):
  (tmp_path / 'weights.npz').write_text('not weights')
  return str(tmp_path / 'weights.npz')


def _truncated_checkpoint(tmp_path):
  data = TI4_CHECKPOINT.read_bytes()
  (tmp_path / 'truncated.npz').write_bytes(data[:len(data) // 2])
  return str(tmp_path / 'truncated.npz')


def _file(tmp_path):
  (tmp_path / 'a_file').write_text('')
  return str(tmp_path / 'a_file')


TINY_PATH = 'experiments/synthetic_tiny.py'
PCAM_PATH = 'experiments/pcam_vit_ti4.py'
# (config, workdir or None for a fresh one, extra flags, run from tmp_path?, needle):
# callables take tmp_path.
MISTAKES = {
    'misspelled key': (TINY_PATH, None, ['--config.fl.round=5'], False,
                       'did you mean --config.fl.rounds'),
    'value of the wrong type': (TINY_PATH, None, ['--config.fl.rounds=abc'], False,
                                'fl.rounds'),
    'bad config argument value': (PCAM_PATH + ':bias,participation=0.5x', None, [], False,
                                  'participation a fraction'),
    'unknown config argument option': (TINY_PATH + ':bias,sampling=x', None, [], False,
                                       "unknown option 'sampling'"),
    'unknown method': (TINY_PATH + ':bitfit', None, [], False, "peft.method='bitfit'"),
    'unknown dp mode': (TINY_PATH + ':bias,dp=clinet', None, [], False, "dp.mode='clinet'"),
    'missing config file': ('experiments/nothere.py', None, [], False, 'nothere.py'),
    'bad value': (TINY_PATH, None, ['--config.fl.clients_per_round=100'], False,
                  'fl.clients_per_round=100'),
    'missing data path': (TINY_PATH, None, ['--config.data.source=folder'], False,
                          'data.path'),
    'workdir is a file': (TINY_PATH, _file, [], False, 'cannot create or write it'),
    'workdir not writable': (TINY_PATH, lambda _: '/proc/x', [], False,
                             "--workdir='/proc/x': cannot create or write it"),
    'checkpoint is a text file': (
        TINY_PATH, None, [lambda t: f'--config.model.checkpoint={_text_file(t)}'], False,
        'not a readable .npz file'),
    'checkpoint truncated': (
        PCAM_PATH, None, [lambda t: f'--config.model.checkpoint={_truncated_checkpoint(t)}'],
        False, 'not a readable .npz file'),
    'checkpoint of another model': (
        TINY_PATH, None, [f'--config.model.checkpoint={TI4_CHECKPOINT}'], False,
        'does not match the model'),
    'relative checkpoint from another directory': (
        str(REPO / PCAM_PATH), None, ['--config.model.checkpoint=ViT-B_16.npz'], True,
        'relative paths start at the working directory'),
    'unknown flag': (TINY_PATH, None, ['--workdr=x'], False, 'workdr'),
    'stray argument': (TINY_PATH, None, ['extra'], False, 'unexpected arguments'),
}


@needs(TI4_CHECKPOINT)
@needs(PCAM)
def test_every_mistake_is_one_line_exit_2_before_any_data_is_read(tmp_path):
  runs = {}
  for i, (mistake, (config, workdir, flags, elsewhere, needle)) in enumerate(MISTAKES.items()):
    case = tmp_path / str(i)
    case.mkdir()
    workdir = workdir(case) if workdir else case / 'work'
    flags = [f(case) if callable(f) else f for f in flags]
    runs[mistake] = (case, elsewhere, needle, launch(  # All at once: each mostly imports.
        workdir, *flags, config=config, cwd=case if elsewhere else REPO, wait=False))
  for mistake, (case, elsewhere, needle, process) in runs.items():
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    line = _one_error_line(result, needle)
    if elsewhere:
      assert str(case) in line, mistake
    assert 'loading' not in result.stdout, mistake  # Nothing was decoded.
    assert not (case / 'work' / 'metrics.jsonl').exists(), mistake


def test_folder_with_too_few_classes_fails_with_exit_2(tmp_path):
  from PIL import Image
  for i in range(3):
    os.makedirs(tmp_path / 'data' / 'train' / 'a', exist_ok=True)
    os.makedirs(tmp_path / 'data' / 'test' / 'a', exist_ok=True)
    Image.new('RGB', (16, 16)).save(tmp_path / 'data' / 'train' / 'a' / f'{i}.jpg')
    Image.new('RGB', (16, 16)).save(tmp_path / 'data' / 'test' / 'a' / f'{i}.jpg')
  result = launch(tmp_path / 'work', '--config.data.source=folder',
                   f'--config.data.path={tmp_path / "data"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'class' in result.stderr


@needs(PCAM)
@needs(TI4_CHECKPOINT)
def test_offline_pcam_config_runs_through_launch(tmp_path):
  """The README's main job, shortened: real data, real backbone, one round."""
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=experiments/pcam_vit_ti4.py:bias',
       f'--workdir={tmp_path}', '--config.fl.rounds=1', '--config.fl.num_clients=64',
       '--config.fl.clients_per_round=2', '--config.data.num_train_examples=5000',
       '--config.data.num_test_examples=1000'],
      cwd=REPO, env=OPTIMIZED_XLA_ENV, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'round    0/1' in result.stdout and 'round    1/1' in result.stdout
  zero, record = map(json.loads, (tmp_path / 'metrics.jsonl').read_text().splitlines())
  # A pretrained backbone with a zero head predicts one class (~50%) before training, as
  # round 0 shows; one round on 2 clients must already move it.
  assert zero['round'] == 0 and 0.4 < zero['test_accuracy'] < 0.6, zero
  assert record['test_accuracy'] > 0.55, record
  assert record['trainable_params'] == 26_114
