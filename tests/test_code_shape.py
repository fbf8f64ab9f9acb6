"""The code stays in small pieces: no function in fedpeft_jax/ is longer than 90 lines
(docstring included) or takes more than 9 parameters (issue 20)."""
import ast

from tests.conftest import REPO

MAX_LINES, MAX_PARAMETERS = 90, 9


def _functions():
  for path in sorted((REPO / 'fedpeft_jax').rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.relative_to(REPO), node


def _parameters(node) -> int:
  a = node.args
  names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
  names = [n for n in names if n not in ('self', 'cls')]
  return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def test_no_function_is_longer_than_90_lines_or_takes_more_than_9_parameters():
  problems = []
  for path, node in _functions():
    lines = node.end_lineno - node.lineno + 1
    if lines > MAX_LINES:
      problems.append(f'{path}:{node.lineno} {node.name}: {lines} lines')
    if _parameters(node) > MAX_PARAMETERS:
      problems.append(f'{path}:{node.lineno} {node.name}: {_parameters(node)} parameters')
  assert not problems, '\n'.join(problems)


def test_the_shape_check_sees_a_long_function():
  source = 'def f(a, b, c, d, e, f, g, h, i, j):\n' + '  x = 1\n' * 95
  node = ast.parse(source).body[0]
  assert node.end_lineno - node.lineno + 1 > MAX_LINES and _parameters(node) == 10
