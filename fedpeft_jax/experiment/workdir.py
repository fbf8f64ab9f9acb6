"""A run's working directory: made and tested at launch, locked while a run uses it,
and holding what made the run (`config.json`, `run.json`)."""
from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax

from fedpeft_jax import errors

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'dp-accounting',
            'tensorflow-datasets', 'ml-collections', 'numpy', 'tensorboardX')
LOCK_FILE = '.lock'


class WorkdirError(errors.UserError):
  pass


def prepare(path: str) -> str:
  """Creates `path` if needed and proves it writable; returns it absolute."""
  absolute = os.path.abspath(path)
  try:
    os.makedirs(absolute, exist_ok=True)
    probe = os.path.join(absolute, f'.write_test.{os.getpid()}')  # One per host process.
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'--workdir={path!r}: cannot create or write it ({e.strerror}); '
                       'give a writable directory') from None
  return absolute


class Lock:
  """An exclusive lock on a workdir for the life of this process.

  `flock` locks die with their process, so a killed run never leaves one
  stuck; a second run in the same workdir is refused at once.
  """

  def __init__(self, path: str):
    self.path = os.path.join(path, LOCK_FILE)
    self._file = open(self.path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      raise WorkdirError(
          f'--workdir={path!r} is in use by a live run ({holder}): wait for it to end, '
          'or give another --workdir') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {platform.node()}, started '
                     f'{datetime.datetime.now().isoformat(timespec="seconds")}')
    self._file.flush()

  def release(self):
    self._file.close()


def write_json(path: str, value) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=1)
    f.write('\n')


def code_version() -> str | None:
  """The git commit of the code (with '+dirty' for uncommitted changes), if in a checkout."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=root, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ('+dirty' if dirty.strip() else '')


def run_info() -> dict:
  """What made a run, besides its config: command, code, packages, devices, time."""
  versions = {}
  for package in PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  devices = jax.devices()
  return {
      'command': [sys.executable] + sys.argv,
      'cwd': os.getcwd(),
      'code_version': code_version(),
      'python': platform.python_version(),
      'packages': versions,
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'host': platform.node(),
      'start_time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
