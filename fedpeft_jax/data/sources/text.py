"""`text`: records of text for causal language modelling, tokenized once at load.

Reads JSON lines (`.jsonl`, `.json`), Parquet (`.parquet`) or CSV (`.csv`) files with
Hugging Face `datasets` (`load_dataset('json'|'parquet'|'csv', data_files=...)`) from
`path`: a folder holding `<split>.<ext>` per split (the split's name is the file's stem;
Hub-style shards `<split>-00000-of-00002.<ext>` are read together), or a `.tar.gz` of
one, either optionally wrapped in one top directory (../shared/data/shakespeare_roles.tar.gz
holds `shakespeare_roles/train.jsonl` and `test.jsonl`). With `path` empty, `name` is a
Hugging Face Hub dataset (`load_dataset(name, split=...)`, which needs a network).

Each record is one sequence: the text of field `text_field`, or for instruction data the
prompt of `prompt_field` then the response of `response_field` (no separator: a template
belongs in the prompt). Its ids are the model directory's tokenizer's
(`hf_checkpoint.load_tokenizer(checkpoint, vocab_size)`, `encode(...,
add_special_tokens=False)`): bos + tokens + eos, truncated at `max_length` (bos and eos
count; a truncated record loses its eos) and right-padded with the pad id (the eos id if
the model has no pad, else 0). `loss_mask` is 1 where the token at t is a target, predicted
from the token at t - 1: every token after bos for plain text, the response's tokens and
eos for instruction data; 0 at bos, prompt and padding.

Clients: field `client_field` names each record's client (returned as `client_ids` when
the natural partition asks). `min_client_examples` > 1 leaves out, from every split, the
clients with fewer records in the training split (`train_split`, counted on the whole split
before `num_examples` takes a subset), as LEAF drops small clients; the count left out is
`Dataset.dropped_clients`. Labels are all 0 of the one class 'text', so `iid` and
`quantity` split text too; `num_classes` and `image_size` do not apply.

Reads config keys data.path, data.name, data.train_split, data.text_field,
data.prompt_field, data.response_field, data.client_field, data.max_length,
data.min_client_examples and model.checkpoint (the model directory or Hub id).
"""
from __future__ import annotations

import collections
import os
import pathlib
import re
import tarfile
import tempfile
from typing import NamedTuple

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.sources import SOURCES
from fedpeft_jax.data.sources.base import (DataError, Dataset, Request, SourceSpec,
                                           label_map, progress, subset)

FORMATS = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.csv': 'csv'}
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
CLASS_NAMES = ('text',)
_CHUNK = 1024  # Records tokenized per call (and progress step).


class Options(NamedTuple):
  """The source's own arguments (`SourceSpec.keys`: each one's config key)."""
  path: str = ''  # data.path
  name: str = ''  # data.name: a Hub dataset, read when `path` is ''.
  checkpoint: str = ''  # model.checkpoint: the directory (or Hub id) with tokenizer.json.
  train_split: str = 'train'  # data.train_split: where min_client_examples counts.
  text_field: str = 'text'
  prompt_field: str = ''
  response_field: str = ''
  client_field: str = 'client'
  max_length: int = 128
  min_client_examples: int = 1


def load(request: Request, **options) -> Dataset:
  """Reads and tokenizes `request.split` (see the module docstring for `options`).

  Returns a Dataset with `images` None, `features` {'input_ids': int32 [N, max_length],
  'loss_mask': uint8 [N, max_length]}, `labels` int32 zeros [N], `class_names` ('text',),
  `client_ids` [N] with `request.clients`, and `dropped_clients`. Raises DataError naming
  its argument: 'path' (missing, unreadable), 'name' (not fetched), 'split' (no such file or
  split; a class name other than 'text'), a field argument ('text_field', ...: the file
  lacks it or holds a non-text value there), 'checkpoint' (no tokenizer, or one that does
  not fit the model's vocabulary), 'max_length' (< 2), 'min_client_examples' (nothing
  left), 'num_examples' (a subset larger than the split).
  """
  o = Options(**options)
  if o.max_length < 2:  # bos and one target at least.
    raise DataError(f'max_length={o.max_length}: a sequence needs at least 2 tokens (bos '
                    'and one predicted token).', argument='max_length')
  class_names = label_map(CLASS_NAMES, request.class_names, f'text split {request.split!r}',
                          'class name', "load every split with the text source")
  tokenizer = _tokenizer(o.checkpoint)
  wants_clients = request.clients or o.min_client_examples > 1
  fields = _fields(o, wants_clients)
  columns, where = _read(o, request.split, fields,
                         o.train_split if o.min_client_examples > 1 else None)
  clients = columns.get('client_field')
  rows = len(next(iter(columns.values())))
  keep, dropped = _kept(rows, clients, columns.get('train_clients'), o.min_client_examples,
                        where)
  columns = {k: [v[i] for i in keep] for k, v in columns.items() if k != 'train_clients'}
  input_ids, loss_mask = _tokenize(columns, tokenizer, o.max_length, request.split)
  ds = Dataset(None, np.zeros(len(input_ids), np.int32), class_names,
               np.asarray(columns['client_field']) if request.clients else None,
               {'input_ids': input_ids, 'loss_mask': loss_mask},
               dropped if clients is not None else None)
  if request.num_examples is None:
    return ds
  return subset(ds, request.num_examples, f'text data {where} split {request.split!r}')


def _fields(o: Options, wants_clients: bool) -> dict[str, str]:
  """The option naming each field to read -> the field's name."""
  if bool(o.prompt_field) != bool(o.response_field):
    missing = 'response_field' if o.prompt_field else 'prompt_field'
    raise DataError(f'Instruction data needs both prompt_field and response_field; '
                    f'{missing} is empty.', argument=missing)
  if o.prompt_field:
    fields = {'prompt_field': o.prompt_field, 'response_field': o.response_field}
  elif o.text_field:
    fields = {'text_field': o.text_field}
  else:
    raise DataError('text_field is empty: name the field holding each record\'s text, or '
                    'set prompt_field and response_field.', argument='text_field')
  if wants_clients:
    if not o.client_field:
      raise DataError('client_field is empty: name the field holding each record\'s client '
                      '(the natural partition and min_client_examples read it).',
                      argument='client_field')
    fields['client_field'] = o.client_field
  return fields


def _tokenizer(checkpoint: str):
  """The model directory's `hf_checkpoint.Tokenizer`, checked against its vocab_size."""
  from fedpeft_jax.model import hf_checkpoint, llama  # pylint: disable=import-outside-toplevel
  if not checkpoint:
    raise DataError('The text source tokenizes with the model\'s tokenizer.json: set the '
                    'model directory (or Hub id).', argument='checkpoint')
  try:
    directory = hf_checkpoint.resolve(checkpoint)
    vocab_size = llama.LlamaConfig.from_file(os.path.join(directory, 'config.json')).vocab_size
    tokenizer = hf_checkpoint.load_tokenizer(directory, vocab_size)
  except errors.UserError as e:
    raise DataError(str(e), argument='checkpoint') from None
  tokenizer.tokenizer.no_truncation()  # A tokenizer.json may carry its own; ours is max_length.
  tokenizer.tokenizer.no_padding()
  return tokenizer


def _read(o: Options, split: str, fields: dict[str, str], train_split: str | None):
  """({option: column as a list}, where) of `split`; with `train_split`, also the training
  split's client column as 'train_clients' (the same list when it is this split)."""
  import datasets  # pylint: disable=import-outside-toplevel
  bars = not datasets.utils.are_progress_bars_disabled()
  datasets.disable_progress_bars()  # Ours is the tokenizer's; theirs would repeat per file.
  try:
    if o.path:
      return _read_path(o.path, split, fields, train_split)
    return _read_hub(o.name, split, fields, train_split)
  finally:
    if bars:
      datasets.enable_progress_bars()


def _read_hub(name: str, split: str, fields: dict[str, str], train_split: str | None):
  import datasets  # pylint: disable=import-outside-toplevel
  if not name:
    raise DataError('The text source needs path (a folder or .tar.gz of train/test '
                    '.jsonl, .parquet or .csv files) or name (a Hugging Face Hub dataset).',
                    argument='path')

  def get(split_name):
    try:
      return datasets.load_dataset(name, split=split_name)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f'Hub dataset {name!r} split {split_name!r} could not be loaded ({type(e).__name__}: '
          f'{_reason(e)}): reading a dataset by name needs a network; offline, set data.path to '
          'a local folder or .tar.gz of <split>.jsonl|.parquet|.csv files.',
          argument='name') from None

  where = f'Hub dataset {name!r}'
  columns = _columns(get(split), fields, f'{where} split {split!r}')
  if train_split is not None:
    columns['train_clients'] = (columns['client_field'] if train_split == split else _columns(
        get(train_split), {'client_field': fields['client_field']},
        f'{where} split {train_split!r}')['client_field'])
  return columns, where


def _read_path(path: str, split: str, fields: dict[str, str], train_split: str | None):
  """`_read` of a folder or archive at `path`."""
  if not os.path.exists(path):
    raise DataError(f'Data path {path!r} does not exist (looked in '
                    f'{os.path.dirname(os.path.abspath(path))}; relative paths start at the '
                    f'working directory {os.getcwd()}).', argument='path')
  splits = [split] + ([train_split] if train_split not in (None, split) else [])
  with tempfile.TemporaryDirectory(prefix='fedpeft_text_') as tmp:
    if os.path.isdir(path):
      files = _directory_files(path, splits)
    elif path.endswith(_ARCHIVE_SUFFIXES):
      files = _archive_files(path, splits, tmp)
    else:
      raise DataError(f'Data path {path!r} is neither a directory nor a '
                      f'{"/".join(_ARCHIVE_SUFFIXES)} archive.', argument='path')
    columns = _columns(_load_files(files[split], path, tmp), fields,
                       f'{path!r} file {files[split][1]}')
    if train_split is not None:
      train = columns['client_field'] if train_split == split else _columns(
          _load_files(files[train_split], path, tmp),
          {'client_field': fields['client_field']},
          f'{path!r} file {files[train_split][1]}')['client_field']
      columns['train_clients'] = train
  return columns, repr(path)


def _reason(e: BaseException) -> str:
  """An exception's message on one line, at most 200 characters."""
  return ' '.join(str(e).split())[:200] or type(e).__name__


def _split_of(name: str) -> str | None:
  """The split a data file's name holds ('train.jsonl', 'train-00000-of-00002.parquet':
  'train'); None for other files."""
  stem, suffix = os.path.splitext(name)
  if suffix.lower() not in FORMATS:
    return None
  shard = re.fullmatch(r'(.+)-\d+-of-\d+', stem)
  return shard.group(1) if shard else stem


def _pick(names: list[str], splits: list[str], where: str) -> dict[str, tuple[str, ...]]:
  """Each split -> its data files among `names` (posix paths below `where`): those at the
  top, else those in the one subdirectory that holds data files."""
  data = [n for n in names if n.count('/') <= 1 and _split_of(n.rsplit('/', 1)[-1])]
  top = [n for n in data if '/' not in n]
  folders = sorted({n.split('/')[0] for n in data if '/' in n})
  chosen = top or (data if len(folders) == 1 else [])
  found = {}
  for split in splits:
    files = tuple(sorted(n for n in chosen if _split_of(n.rsplit('/', 1)[-1]) == split))
    if not files:
      shown = sorted(data)[:8]
      raise DataError(
          f'Text data {where} has no {split}.jsonl, .json, .parquet or .csv file (nor '
          f'{split}-NNNNN-of-NNNNN shards) at its top or in one top folder; its data files: '
          f'{shown or "none"}; the split is the file name without its suffix.',
          argument='split')
    kinds = {FORMATS[os.path.splitext(f)[1].lower()] for f in files}
    if len(kinds) > 1:
      raise DataError(f'Text data {where} holds split {split!r} in several formats '
                      f'({", ".join(files)}): keep one.', argument='split')
    found[split] = files
  return found


def _directory_files(path: str, splits: list[str]) -> dict[str, tuple[str, str]]:
  """Each split -> (its files' paths, their names below `path` for messages)."""
  base = pathlib.Path(path)
  names = [p.relative_to(base).as_posix() for p in base.glob('*') if p.is_file()]
  names += [p.relative_to(base).as_posix() for p in base.glob('*/*') if p.is_file()]
  picked = _pick(names, splits, repr(path))
  return {s: (tuple(str(base / f) for f in files), ', '.join(files))
          for s, files in picked.items()}


def _archive_files(path: str, splits: list[str], tmp: str) -> dict[str, tuple[str, str]]:
  """`_directory_files` of an archive: the wanted splits' files extracted into `tmp`."""
  names, kept = [], {}
  try:
    with tarfile.open(path) as tar:
      for member in tar:
        name = pathlib.PurePosixPath(member.name).as_posix().removeprefix('./')
        if not member.isfile() or name.count('/') > 1:
          continue
        names.append(name)
        if _split_of(name.rsplit('/', 1)[-1]) in splits:
          target = os.path.join(tmp, 'extracted', *name.split('/'))
          os.makedirs(os.path.dirname(target), exist_ok=True)
          with tar.extractfile(member) as source, open(target, 'wb') as out:
            out.write(source.read())
          kept[name] = target
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f'Cannot read archive {path!r} ({_reason(e)}); re-create or re-download '
                    'it.', argument='path') from None
  picked = _pick(names, splits, repr(path))
  return {s: (tuple(kept[f] for f in files), ', '.join(files)) for s, files in picked.items()}


def _load_files(files: tuple[tuple[str, ...], str], path: str, tmp: str):
  """The records of `files` ((local paths, their names in `path`)) as a `datasets.Dataset`,
  built in `tmp` (no cache left behind)."""
  import datasets  # pylint: disable=import-outside-toplevel
  local, shown = files
  kind = FORMATS[os.path.splitext(local[0])[1].lower()]
  # A CSV cell is text: an empty one is '' (pandas would read it as a missing value).
  extra = {'keep_default_na': False} if kind == 'csv' else {}
  try:
    return datasets.load_dataset(kind, data_files={'records': list(local)}, split='records',
                                 cache_dir=os.path.join(tmp, 'cache'), keep_in_memory=True,
                                 **extra)
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__cause__ or e
    raise DataError(f'Cannot read {shown} in {path!r} as {kind} ({type(cause).__name__}: '
                    f'{_reason(cause)}); fix or re-create the file.', argument='path') from None


def _columns(records, fields: dict[str, str], where: str) -> dict[str, list]:
  """{option: the field's values as a list} of `records`; DataError (argument: the option)
  for a field the records lack, or a value that is null (or, but for the client, not
  text)."""
  have = list(records.column_names)
  columns = {}
  for option, field in fields.items():
    if field not in have:
      raise DataError(f'{where} has no field {field!r}; its fields are {have}: set '
                      f'{option} to one of them.', argument=option)
    values = records.data.column(field).to_pylist()
    for row, value in enumerate(values):
      if value is None or (option != 'client_field' and not isinstance(value, str)):
        raise DataError(f'{where}: record {row} has {value!r} in field {field!r}, not '
                        f'{"text" if option != "client_field" else "a client id"}; fix the '
                        f'record or set {option} to another field.', argument=option)
    columns[option] = values
  return columns


def _kept(rows: int, clients: list | None, train_clients: list | None, min_examples: int,
          where: str) -> tuple[list[int], int]:
  """(the rows of the `rows` whose client holds min_examples training records or more, how
  many of the split's clients are left out); every row when min_examples <= 1."""
  if clients is None or min_examples <= 1:
    return list(range(rows)), 0
  counts = collections.Counter(train_clients)
  small = {c for c in set(clients) if counts[c] < min_examples}
  keep = [i for i, c in enumerate(clients) if c not in small]
  if not keep:
    raise DataError(f'No client of text data {where} holds min_client_examples='
                    f'{min_examples} training records (the most: '
                    f'{max(counts.values(), default=0)}): lower it.',
                    argument='min_client_examples')
  return keep, len(small)


def _tokenize(columns: dict[str, list], tokenizer, max_length: int, split: str):
  """(input_ids int32 [N, max_length], loss_mask uint8 [N, max_length]) of the records."""
  body_field = 'response_field' if 'response_field' in columns else 'text_field'
  bodies = _encode(tokenizer, columns[body_field], f'tokenizing {split!r}')
  prompts = (_encode(tokenizer, columns['prompt_field'], f'tokenizing {split!r} prompts')
             if 'prompt_field' in columns else None)
  return pack(bodies, max_length, tokenizer.bos_id, tokenizer.eos_id,
              _pad_id(tokenizer), prompts)


def _pad_id(tokenizer) -> int:
  for token in (tokenizer.pad_id, tokenizer.eos_id):
    if token is not None:
      return token
  return 0


def _encode(tokenizer, texts: list[str], description: str) -> list[list[int]]:
  """Each text's token ids without special tokens, in chunks, with a progress bar."""
  chunks = range(0, len(texts), _CHUNK)
  encoded = []
  for start in progress(chunks, description, total=len(chunks), unit='chunk'):
    batch = tokenizer.tokenizer.encode_batch(texts[start:start + _CHUNK],
                                             add_special_tokens=False)
    encoded += [e.ids for e in batch]
  return encoded


def pack(bodies: list[list[int]], max_length: int, bos_id: int | None, eos_id: int | None,
         pad_id: int, prompts: list[list[int]] | None = None):
  """(input_ids int32 [N, max_length], loss_mask uint8 [N, max_length]): row i is
  bos + prompts[i] + bodies[i] + eos (bos, eos left out when None), truncated at
  max_length and right-padded with `pad_id`; loss_mask 1 on the tokens of bodies[i] and
  eos that are kept (never at position 0, which nothing predicts)."""
  head = [] if bos_id is None else [bos_id]
  tail = [] if eos_id is None else [eos_id]
  input_ids = np.full((len(bodies), max_length), pad_id, np.int32)
  loss_mask = np.zeros((len(bodies), max_length), np.uint8)
  for i, body in enumerate(bodies):
    prompt = head + (prompts[i] if prompts is not None else [])
    sequence = (prompt + body + tail)[:max_length]
    input_ids[i, :len(sequence)] = sequence
    loss_mask[i, max(len(prompt), 1):len(sequence)] = 1
  return input_ids, loss_mask


def _check(config, needs_data: bool):
  """Launch checks of the keys the source reads; with `needs_data`, that data.path exists
  and that the model directory's tokenizer fits its vocabulary (no data read)."""
  d = config.data
  if d.max_length < 2:
    return 'data.max_length', 'must be >= 2: bos and at least one predicted token'
  if d.min_client_examples < 1:
    return 'data.min_client_examples', 'must be >= 1 (1: every client is kept)'
  try:
    _fields(Options(text_field=d.text_field, prompt_field=d.prompt_field,
                    response_field=d.response_field, client_field=d.client_field),
            PARTITIONS.get(d.partition).needs_client_ids or d.min_client_examples > 1)
  except DataError as e:
    return f'data.{e.argument}', str(e)
  if not needs_data:
    return None
  if d.path and not os.path.exists(d.path):
    return 'data.path', ('no such folder or archive: give a directory or .tar.gz holding '
                         'train and test .jsonl, .parquet or .csv files')
  if not d.path and not d.name:
    return 'data.path', ('is empty and so is data.name: give a folder or .tar.gz of text '
                         'files, or a Hugging Face Hub dataset name')
  checkpoint = config.model.checkpoint
  from fedpeft_jax.model import hf_checkpoint  # pylint: disable=import-outside-toplevel
  if not hf_checkpoint.is_hub_id(checkpoint) or os.path.isdir(checkpoint):  # Hub: at load.
    try:
      _tokenizer(checkpoint)
    except DataError as e:
      return 'model.checkpoint', str(e)
  return None


SOURCES.register('text', SourceSpec(
    load=load, summary='JSON lines, Parquet or CSV text records (a folder, .tar.gz or Hub '
    'dataset), tokenized by the model\'s tokenizer',
    keys={'path': 'data.path', 'name': 'data.name', 'checkpoint': 'model.checkpoint',
          'train_split': 'data.train_split', 'text_field': 'data.text_field',
          'prompt_field': 'data.prompt_field', 'response_field': 'data.response_field',
          'client_field': 'data.client_field', 'max_length': 'data.max_length',
          'min_client_examples': 'data.min_client_examples'},
    check=_check, clients="source='text' with data.client_field",
    features=('input_ids', 'loss_mask')))
