r"""Runs a FedPEFT experiment from an ml_collections config.

  python launch.py --config=experiments/pcam_vit_ti4.py:bias --workdir=/tmp/pcam
  python launch.py --config=experiments/pcam_vit_ti4.py:bias --mode=config
  python launch.py --config=experiments/cifar100_vit_b16.py:adapter --mode=masks \
      --workdir=/tmp/masks
  python launch.py --config=experiments/pcam_vit_ti4.py:bias,dp=client --mode=privacy \
      --workdir=/tmp/dp --config.dp.target_epsilon=8
  python launch.py --mode=report --workdir=runs/sweep
  python launch.py --config=experiments/shakespeare_tiny_llama.py:lora --workdir=/tmp/sh_lora \
      --mode=sample --prompt='Now is the winter of' --temperature=0.8

A user's mistake (a bad flag or config value, a missing or broken file, a busy
workdir) ends the run before any work with one line naming it and the fix, and
exit status 2. Library INFO logging is off unless asked for with --verbosity=0.
"""
import difflib
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import multihost
from fedpeft_jax.experiment import reports
from fedpeft_jax.experiment import results
from fedpeft_jax.experiment import sample
from fedpeft_jax.experiment import sweep
from fedpeft_jax.experiment import train
from fedpeft_jax.experiment import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file with an optional argument: '
    'path.py:METHOD[,dp=none|client|sample][,clients=N][,participation=F].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and outputs are written '
                               '(not needed by --mode=config).')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'sweep', 'masks', 'privacy', 'config', 'report', 'sample'],
    'train: run (or resume) the experiment; sweep: run (or resume) every point the config '
    "file's get_sweep() declares, each in WORKDIR/<point>; masks: trainable parameters of "
    'every PEFT method, or of a comma list in --config.peft.method (no data, no weights); '
    'privacy: the epsilon the configured run will deliver (trains nothing); config: print '
    'every config key with its value; report: tables and figures of the runs under '
    '--workdir (needs no --config); sample: print the continuation of --prompt by the '
    "config's decoder with the workdir's trained trainable.npz.")
_PROMPT = flags.DEFINE_string(
    'prompt', None, '--mode=sample: the text to continue (tokenized as the text source '
    "does: bos + the model tokenizer's tokens).")
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 0.0, '--mode=sample: 0 continues greedily (the most likely token each '
    'step); above 0 samples from softmax(logits / temperature).')
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    'max_new_tokens', 64, '--mode=sample: at most this many tokens are generated (fewer at '
    "eos or the model's max_position_embeddings).")
_SAMPLE_SEED = flags.DEFINE_integer(
    'sample_seed', 0, '--mode=sample: the random key of sampling (--temperature > 0): the '
    'same seed gives the same text.')
_TARGET_ACCURACY = flags.DEFINE_float(
    'target_accuracy', None, '--mode=report: the test accuracy (a fraction) to report the '
    "MiB sent to reach; default: the runs' report.target_accuracy.")
_TARGET_PERPLEXITY = flags.DEFINE_float(
    'target_perplexity', None, '--mode=report on text runs: the test perplexity to report '
    "the MiB sent to reach; default: the runs' report.target_perplexity.")
_SWEEP_DRY_RUN = flags.DEFINE_bool(
    'sweep_dry_run', False, '--mode=sweep: print one launch.py command per point instead '
    'of running them (to dispatch points to many machines).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Multi-host (TPU pod slice, multi-node GPU): call '
    'jax.distributed.initialize() first; run the same command on every host. TPU and '
    'cluster environments are detected; elsewhere give the three flags below.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, '--distributed: HOST:PORT of process 0, e.g. '
    'localhost:12345 or 10.0.0.2:12345 (the same on every process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      '--distributed: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   '--distributed: this process, 0..num_processes-1.')

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _unknown_config_key(argv: list[str]) -> str | None:
  """The first `--config.KEY=...` whose KEY no config has, as a message with the closest."""
  known = list(configs.flat_config(configs.base_config()))
  for arg in argv:
    key = arg.lstrip('-').split('=', 1)[0].removeprefix('config.')
    if arg.startswith('--config.') and key not in known:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      hint = f'did you mean {" or ".join("--config." + k for k in close)}? ' if close else ''
      return (f'{arg}: no such config key; {hint}'
              '`launch.py --config=FILE --mode=config` lists every key')
  return None


def _config_file_error(e: BaseException) -> str | None:
  """A config file's own check of its argument (a `UserError` raised in `get_config`)."""
  while e is not None and not isinstance(e, errors.UserError):
    e = e.__cause__ or e.__context__
  if e is None:
    return None
  # ml_collections re-raises it with the traceback as text: its last line is the message.
  last = str(e).strip().splitlines()[-1]
  return last.split('UserError: ', 1)[-1]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake in it reported as one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # Flag and config-override errors come in many types.
    _fail(_unknown_config_key(argv) or _config_file_error(e) or
          f'{str(e).strip().splitlines()[0]}; `launch.py --helpfull` lists the flags')


def _load_config():
  try:
    config = _CONFIG.value
    config.peft  # ml_collections defers a missing file's error until first use.
    return config
  except OSError:
    path = flags.FLAGS['config'].config_filename.split(':', 1)[0]
    _fail(f'--config={path}: no such config file (relative paths start at the working '
          f'directory {os.getcwd()}); the shipped ones are in experiments/')


def print_config(config) -> None:
  """Every key as a flag with its value, and the base default where the file changed it."""
  defaults = configs.flat_config(configs.base_config(config.peft.method))
  for key, value in configs.flat_config(config).items():
    note = f'  # base default: {defaults[key]!r}' if defaults.get(key, value) != value else ''
    print(f'--config.{key}={value!r}{note}')


def _check_before_training(config) -> None:
  """Everything checkable without the data: values, paths, the checkpoint's headers."""
  validation.validate(config)
  build.check_pretrained(config, build.build_model(config))


def _sample(config) -> None:
  """Prints the continuation of --prompt by the config's decoder and the workdir's
  trainable.npz; every mistake is one line (UserError) before the model is loaded."""
  if _PROMPT.value is None:
    _fail("--mode=sample needs --prompt='TEXT', the text to continue")
  if _MAX_NEW_TOKENS.value < 1:
    _fail(f'--max_new_tokens={_MAX_NEW_TOKENS.value}: must be >= 1')
  if not _TEMPERATURE.value >= 0:
    _fail(f'--temperature={_TEMPERATURE.value}: must be >= 0 (0: greedy)')
  sample.check_task(config)
  validation.validate(config, needs_data=False)
  sample.trainable_path(_WORKDIR.value)  # Before the model is built: run training first.
  sample.merged_path(config, _WORKDIR.value)  # A merging LoRA rule's merged.npz, too.
  build.check_pretrained(config, build.build_model(config))
  try:
    text = sample.sample(config, _WORKDIR.value, _PROMPT.value, _MAX_NEW_TOKENS.value,
                         _TEMPERATURE.value, _SAMPLE_SEED.value)
  except errors.UserError as e:
    if e.argument == 'prompt':
      _fail(f'--prompt: {e}')
    raise
  print(text)


def _sweep() -> None:
  """Runs (or prints) every point of the config file's sweep, then writes the report."""
  path, _, arg = flags.FLAGS['config'].config_filename.partition(':')
  # Values set on the command line (--config.fl.rounds=3) apply to every point.
  common = config_flags.get_override_values(flags.FLAGS['config'])
  if _SWEEP_DRY_RUN.value:
    module = sweep.load_module(path)
    for point in sweep.points(module, path, arg):
      print(sweep.command(path, point, common, _WORKDIR.value))
    return
  sweep.run(path, arg, common, _WORKDIR.value,
            validate=lambda c: multihost.agree(lambda: _check_before_training(c)),
            train=train.train)
  if multihost.is_primary():
    results.write_report(_WORKDIR.value, _TARGET_ACCURACY.value, _TARGET_PERPLEXITY.value)


def _initialize_distributed() -> None:
  given = [f for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
  if not given:
    jax.distributed.initialize()  # TPU pods and clusters describe themselves.
    return
  if len(given) < 3:
    _fail('--coordinator_address, --num_processes and --process_id go together: give all '
          'three, or none where the environment is detected (TPU, Slurm)')
  if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    _fail(f'--process_id={_PROCESS_ID.value}: must be in 0..{_NUM_PROCESSES.value - 1}')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def _last_checkpoint_line(workdir: str) -> str:
  step = resume.latest_round(workdir)
  if step is None:
    return f'no checkpoint was written yet in {workdir}/checkpoints'
  return (f'the last checkpoint is round {step} in {workdir}/checkpoints; '
          'run the same command to resume from it')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and XLA chatter only on request.
  mode = _MODE.value
  if mode != 'report' and not flags.FLAGS['config'].present:
    _fail(f'--mode={mode} needs --config=FILE')
  config = _load_config() if mode != 'report' else None
  if mode == 'config':
    print_config(config)
    return
  if not _WORKDIR.value:
    _fail(f'--mode={mode} needs --workdir=DIR, where its outputs are written')
  if _DISTRIBUTED.value:
    _initialize_distributed()
  if mode in ('report', 'masks', 'privacy', 'sample') and not multihost.is_primary():
    return  # Reports are written (and samples printed) once.
  try:
    if mode == 'sweep':
      _sweep()
      return
    if mode == 'report':  # Reads finished runs; needs no config.
      results.write_report(_WORKDIR.value, _TARGET_ACCURACY.value, _TARGET_PERPLEXITY.value)
      return
    if mode == 'sample':  # Reads a finished run's trainable.npz; writes nothing.
      _sample(config)
      return
    if mode == 'train':
      multihost.agree(lambda: _check_before_training(config))
    else:
      validation.validate(config, needs_weights=False,
                          needs_data=mode == 'privacy' and config.dp.mode == 'sample',
                          method_list=mode == 'masks')
    workdir = workdir_lib.prepare(_WORKDIR.value)
    if mode == 'masks':
      reports.write_mask_report(config, workdir)
    elif mode == 'privacy':
      reports.write_privacy_report(config, workdir)
    else:
      train.train(config, workdir)
  except errors.UserError as e:
    _fail(str(e))
  except callbacks.TrainingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    where = ('the same command resumes the sweep where it stopped' if mode == 'sweep' else
             _last_checkpoint_line(os.path.abspath(_WORKDIR.value)))
    print(f'interrupted: {where}', file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
