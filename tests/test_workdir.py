"""The workdir: made and proven writable at launch, locked while a run uses it."""
import multiprocessing
import os

import pytest

from fedpeft_jax.experiment import workdir


def test_prepare_makes_the_directory_and_refuses_files_and_unwritable_places(tmp_path):
  path = workdir.prepare(str(tmp_path / 'a' / 'b'))
  assert os.path.isdir(path) and os.listdir(path) == []
  (tmp_path / 'file').write_text('')
  with pytest.raises(workdir.WorkdirError, match=r"--workdir='.*file': cannot create"):
    workdir.prepare(str(tmp_path / 'file'))
  with pytest.raises(workdir.WorkdirError, match='give a writable directory'):
    workdir.prepare('/proc/fedpeft')


def _hold_lock(path, ready, release):
  lock = workdir.Lock(path)
  ready.set()
  release.wait(30)
  lock.release()


def test_a_locked_workdir_is_refused_until_its_holder_ends(tmp_path):
  context = multiprocessing.get_context('spawn')
  ready, release = context.Event(), context.Event()
  holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
  holder.start()
  assert ready.wait(60)
  with pytest.raises(workdir.WorkdirError, match=f'in use by a live run \\(pid {holder.pid}'):
    workdir.Lock(str(tmp_path))
  holder.kill()  # Dies holding it: the kernel releases the lock with the process.
  holder.join()
  workdir.Lock(str(tmp_path)).release()


def test_run_info_records_code_packages_and_devices():
  info = workdir.run_info()
  assert info['packages']['jax'] and info['packages']['flax']
  assert info['device_count'] >= 1 and info['process_count'] == 1
  assert info['code_version'] is None or len(info['code_version'].split('+')[0]) == 40
