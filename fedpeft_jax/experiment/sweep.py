"""Sweeps declared in config files: one run per point, one after another, resumable.

A config file may declare its grid beside `get_config`, in the spirit of
big_vision's sweep functions:

  def get_sweep(arg):
    return configs.grid({'arg': ['head', 'bias'], 'seed': [0, 1]})

Each point is a dict: `arg` is the config argument the point's config is made
from (`get_config(arg)`: the method sets its learning rate there, so methods are
swept through it), every other key is a config key set on top. Points run into
`ROOT/<point name>/`; a finished point is skipped, a partly done one resumes, so
killing a sweep and re-running its command ends with an uninterrupted sweep's
results.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
from typing import Any

import jax

from fedpeft_jax import configs
from fedpeft_jax import errors
from fedpeft_jax.experiment import console
from fedpeft_jax.experiment import multihost
from fedpeft_jax.experiment import workdir as workdir_lib


class SweepError(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  arg: str  # The config argument, e.g. 'bias,dp=client'.
  overrides: dict[str, Any]  # Config keys set on top of get_config(arg).


def load_module(path: str):
  """A config file as a module (as ml_collections' config flag loads it)."""
  if not os.path.isfile(path):
    raise SweepError(f'--config={path}: no such config file (relative paths start at the '
                     f'working directory {os.getcwd()})')
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _name(arg: str, overrides: dict) -> str:
  """'bias,dp=client' + {'seed': 1} -> 'bias_dp-client_seed-1': a directory name."""
  parts = [arg.replace('=', '-').replace(',', '_')] if arg else []
  parts += [f'{key.split(".")[-1]}-{value}' for key, value in overrides.items()]
  return '_'.join(parts).replace('/', '-')


def points(module, path: str, arg: str) -> list[Point]:
  """The points that `get_sweep(arg)` of the config file `module` (from `path`) declares."""
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'--config={path} declares no get_sweep(arg): add one returning a list '
                     "of point dicts (see experiments/synthetic_tiny.py)")
  declared = module.get_sweep(arg) if arg else module.get_sweep()
  # Keys every point sets alike say nothing about a point: its name leaves them out.
  shared = {k: v for k, v in (declared[0].items() if declared else ())
            if all(k in point and point[k] == v for point in declared)}
  result = []
  for point in declared:
    overrides = {k: v for k, v in point.items() if k != 'arg'}
    point_arg = point.get('arg', arg)
    varying = {k: v for k, v in overrides.items() if k not in shared}
    result.append(Point(_name(point_arg, varying), point_arg, overrides))
  names = [p.name for p in result]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise SweepError(f'--config={path}: get_sweep declares the same point twice: '
                     f'{", ".join(duplicates)}')
  if not result:
    raise SweepError(f'--config={path}: get_sweep declares no points')
  return result


def point_config(module, point: Point, common: dict[str, Any]):
  """The point's config: get_config(arg), its overrides, then the command line's."""
  config = module.get_config(point.arg) if point.arg else module.get_config()
  known = configs.flat_config(config)
  for key, value in {**point.overrides, **common}.items():
    if key not in known:
      raise SweepError(f'sweep point {point.name}: no config key {key!r}')
    section = config
    *parents, leaf = key.split('.')
    for part in parents:
      section = section[part]
    section[leaf] = value
  return config


def command(path: str, point: Point, common: dict[str, Any], root: str) -> str:
  """The `launch.py` command that runs one point: for dispatching points to many machines."""
  flags = [f'--config={path}:{point.arg}' if point.arg else f'--config={path}']
  flags += [f'--config.{k}={v}' for k, v in {**point.overrides, **common}.items()]
  flags.append(f'--workdir={os.path.join(root, point.name)}')
  return 'python launch.py ' + ' '.join(shlex.quote(f) for f in flags)


def use_compilation_cache(root: str) -> str:
  """Points mostly differ in seeds and settings, not in shapes: XLA's persistent cache in
  `root/xla_cache` compiles each distinct round once for the whole sweep and its reruns.
  A cache the user chose (JAX_COMPILATION_CACHE_DIR) is kept. Returns the one in use."""
  if jax.config.values['jax_compilation_cache_dir'] is None:
    jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'xla_cache'))
  return jax.config.values['jax_compilation_cache_dir']


def run(path: str, arg: str, common: dict[str, Any], root: str, *, validate,
        train) -> list[str]:
  """Validates every point first, then trains them in order; returns their workdirs.

  `validate(config)` and `train(config, workdir)` are the launch's own, so a
  point runs exactly as its `command` would.
  """
  module = load_module(path)
  sweep = points(module, path, arg)
  point_configs = [point_config(module, p, common) for p in sweep]
  for point, config in zip(sweep, point_configs):
    try:
      validate(config)
    except errors.UserError as e:
      raise SweepError(f'sweep point {point.name}: {e}') from None
  root = workdir_lib.prepare(root)
  use_compilation_cache(root)
  if multihost.is_primary():
    workdir_lib.write_json(os.path.join(root, 'sweep.json'), {
        'config': path, 'arg': arg, 'common': common,
        'points': [dataclasses.asdict(p) for p in sweep]})
  workdirs = []
  for i, (point, config) in enumerate(zip(sweep, point_configs), 1):
    console.say(f'=== sweep point {i}/{len(sweep)}: {point.name}')
    workdirs.append(os.path.join(root, point.name))
    train(config, workdirs[-1])
  return workdirs
