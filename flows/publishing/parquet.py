"""Publish rows as a Hugging Face–style Parquet dataset folder.

In:  rows (dicts or pydantic models), their `datasets.Features`, and a card description.
Out: a folder that `datasets.load_dataset(str(folder))` loads offline:

    folder/
      data/{split}-00000-of-0000N.parquet   zstd, written with exactly `features.arrow_schema`
      README.md                             dataset card (card.py): YAML `configs`, `dataset_info`, sizes
      manifest.json                         row counts, sha256 per file, overall checksum

The folder is built in a hidden sibling (`.{name}.tmp-<pid>`) and swapped in only once
it is complete, so a crash never leaves half a dataset at `folder`. The same rows give
byte-identical Parquet files and the same checksum, whether they come as a list or as
`CheckedTables` (a run's spooled shards), which are read a part at a time: the writer
holds one row group's rows (at most ~100 MB of Arrow data), not a whole file's.

    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
    publish_dataset(out / "composites", composites, features_for(Composite), card)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from flows.publishing.card import DatasetCardInfo, write_card

FeatureType = datasets.Value | datasets.List | dict[str, Any]

# One chat turn, the default struct for `list[dict[str, str]]` fields such as `messages`.
MESSAGE_FEATURE: dict[str, datasets.Value] = {
    "role": datasets.Value("string"),
    "content": datasets.Value("string"),
}

# Row groups of at most ~100 MB uncompressed, as `datasets` and the Hub viewer expect.
ROW_GROUP_BYTES = 100 * 1024 * 1024
_WRITE_BATCH_ROWS = 1024  # pyarrow's Parquet `write_batch_size`: a column chunk is encoded that many rows at a time

_SCALARS: dict[type, str] = {str: "string", bool: "bool", int: "int64", float: "float64"}


@dataclass(frozen=True)
class TablePart:
    """Rows already checked and converted to the dataset's Arrow schema (`checked_table`),
    e.g. one spooled shard's: how many, their Arrow size, and how to read them."""

    rows: int
    nbytes: int
    read: Callable[[], pa.Table]


@dataclass(frozen=True)
class CheckedTables:
    """A dataset's rows as parts in order (a run's spooled shards), each read only when its
    rows are written."""

    parts: list[TablePart]

    @property
    def num_rows(self) -> int:
        return sum(part.rows for part in self.parts)


@dataclass(frozen=True)
class PublishedDataset:
    path: Path
    num_rows: int
    files: list[Path]  # parquet files written
    checksum: str  # sha256 over the data files' sha256s (see manifest.json)


@dataclass(frozen=True)
class _WrittenFile:
    relpath: str  # "data/train-00000-of-00001.parquet"
    rows: int
    arrow_bytes: int  # uncompressed size, what `datasets` reports as num_bytes
    file_bytes: int
    sha256: str


# --- features from pydantic models -------------------------------------------------


def features_for(
    model: type[pydantic.BaseModel], overrides: Mapping[str, FeatureType] | None = None
) -> datasets.Features:
    """Features for `model`'s fields, in declaration order; `overrides` replace by name."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(model.model_fields))
    if unknown:
        raise ValueError(f"overrides name fields that {model.__name__} does not have: {unknown}")
    features = {}
    for name, info in model.model_fields.items():
        if name in overrides:
            features[name] = overrides[name]
            continue
        try:
            features[name] = _feature_for_annotation(info.annotation)
        except TypeError as err:
            raise TypeError(
                f"{model.__name__}.{name}: {err}; pass overrides={{{name!r}: ...}}"
            ) from None
    return datasets.Features(features)


def _feature_for_annotation(annotation: Any) -> FeatureType:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return datasets.Value(_SCALARS[annotation])
    if origin in (typing.Union, types.UnionType):
        present = [arg for arg in args if arg is not type(None)]
        if len(present) == 1:  # `X | None`: every arrow column is nullable anyway
            return _feature_for_annotation(present[0])
    if origin is Literal:
        kinds = {type(arg) for arg in args}
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            return datasets.Value(_SCALARS[next(iter(kinds))])
    if origin is list and len(args) == 1:
        if args[0] == dict[str, str]:
            return datasets.List(dict(MESSAGE_FEATURE))
        return datasets.List(_feature_for_annotation(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return dict(features_for(annotation))
    raise TypeError(f"unsupported annotation {annotation!r}")


# --- publishing --------------------------------------------------------------------


def publish_dataset(
    folder: Path,
    rows: Sequence[dict] | Sequence[pydantic.BaseModel] | CheckedTables,
    features: datasets.Features,
    card: DatasetCardInfo,
    *,
    rows_per_file: int = 50_000,
    split: str = "train",
) -> PublishedDataset:
    """Write `rows` as a dataset at `folder`, replacing what was there only on success."""
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    if not re.fullmatch(r"\w+(\.\w+)*", split):
        raise ValueError(f"split {split!r}: use letters, digits, '_' and '.' only")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = _write_data_files(staging, rows, features, rows_per_file, split)
        write_card(staging / "README.md", card, features, written, split)
        checksum = _write_manifest(staging / "manifest.json", features, written, split)
        _swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PublishedDataset(
        path=folder,
        num_rows=rows.num_rows if isinstance(rows, CheckedTables) else len(rows),
        files=[folder / w.relpath for w in written],
        checksum=checksum,
    )


def _write_data_files(
    staging: Path,
    rows: Sequence[dict] | Sequence[pydantic.BaseModel] | CheckedTables,
    features: datasets.Features,
    rows_per_file: int,
    split: str,
) -> list[_WrittenFile]:
    (staging / "data").mkdir(parents=True)
    parts = rows.parts if isinstance(rows, CheckedTables) else _checked_parts(rows, features, rows_per_file)
    total = sum(part.rows for part in parts)
    files = max(1, -(-total // rows_per_file))  # zero rows still give one (empty) file: the schema is on disk
    stream, written = _RowStream(parts), []
    for index in range(files):
        start, stop = index * rows_per_file, min(total, (index + 1) * rows_per_file)
        relpath = f"data/{split}-{index:05d}-of-{files:05d}.parquet"
        arrow_bytes = _write_parquet(staging / relpath, stream, stop - start, _sizing_bytes(parts, start, stop),
                                     features.arrow_schema)
        written.append(_describe_file(staging, relpath, stop - start, arrow_bytes))
    return written


def checked_table(rows: Sequence[dict] | Sequence[pydantic.BaseModel], features: datasets.Features,
                  first_index: int = 0) -> pa.Table:
    """`rows` as a table of exactly `features.arrow_schema`, refusing unknown and missing keys
    (errors name the row: `first_index` + its position)."""
    nested = [(key, feature) for key, feature in features.items() if _has_struct(feature)]
    checked = [_checked_row(row, features, nested, first_index + offset) for offset, row in enumerate(rows)]
    return _to_table(checked, features.arrow_schema, first_index)


def _checked_parts(rows: Sequence, features: datasets.Features, rows_per_file: int) -> list[TablePart]:
    tables = [checked_table(rows[start : start + rows_per_file], features, start)
              for start in range(0, len(rows), rows_per_file)]
    return [TablePart(table.num_rows, table.nbytes, lambda table=table: table) for table in tables]


class _RowStream:
    """The rows of `parts` in order, a part read when its first row is taken and let go
    once its last is."""

    def __init__(self, parts: Iterable[TablePart]) -> None:
        self._parts = iter(parts)
        self._table: pa.Table | None = None

    def take(self, count: int) -> list[pa.Table]:
        taken = []
        while count:
            if self._table is None or not self._table.num_rows:
                part = next(self._parts, None)
                if part is None:
                    raise ValueError(f"{count} row(s) short of what the parts said they hold")
                self._table = part.read()
                if self._table.num_rows != part.rows:
                    raise ValueError(f"a part said it holds {part.rows} rows, read {self._table.num_rows}")
            piece = self._table.slice(0, count)
            self._table = self._table.slice(piece.num_rows)
            taken.append(piece)
            count -= piece.num_rows
        return taken


def _sizing_bytes(parts: list[TablePart], start: int, stop: int) -> int:
    """The Arrow size that sets the row groups of the file of rows start..stop: the sizes of
    its 1,024-row blocks counted from `start`, each a fresh table. It depends on the rows
    alone, not on how they came in parts (shards), so the same rows give the same file.

    That takes a pass over the rows before writing them, one part at a time; it is skipped
    when the parts the rows are in are too small in all to need a second row group."""
    reaching, first = [], 0
    for part in parts:
        if first < stop and first + part.rows > start:
            skip = max(0, start - first)
            rest = functools.partial(_read_from, part, skip)
            reaching.append(TablePart(part.rows - skip, part.nbytes, rest))
        first += part.rows
    upper = sum(part.nbytes for part in reaching)  # blocks add a few bytes each: far below twice this
    if upper <= ROW_GROUP_BYTES // 2:
        return upper
    stream, rows = _RowStream(reaching), stop - start
    return sum(_fresh(stream.take(min(_WRITE_BATCH_ROWS, rows - offset))).nbytes
               for offset in range(0, rows, _WRITE_BATCH_ROWS))


def _read_from(part: TablePart, skip: int) -> pa.Table:
    return part.read().slice(skip)


def _checked_row(
    row: dict | pydantic.BaseModel,
    features: datasets.Features,
    nested: list[tuple[str, FeatureType]],
    index: int,
) -> Mapping[str, Any]:
    values = row.model_dump() if isinstance(row, pydantic.BaseModel) else row
    if not isinstance(values, Mapping):
        kind = type(row).__name__
        raise TypeError(f"row {index}: expected a dict or a pydantic model, got {kind}")
    _check_keys(values, features, index, ())
    for key, feature in nested:
        _check_nested_keys(values[key], feature, index, (key,))
    return values


def _check_keys(values: Mapping, struct: Mapping[str, Any], index: int, path: tuple) -> None:
    # pyarrow silently drops unknown keys and fills missing ones with null: refuse both.
    if values.keys() == struct.keys():
        return
    for key in values:
        if key not in struct:
            name = _path_name(path + (key,))
            raise ValueError(f"row {index}: key {name!r} is not in the features {list(struct)}")
    for key in struct:
        if key not in values:
            raise ValueError(f"row {index}: missing key {_path_name(path + (key,))!r}")


def _check_nested_keys(value: Any, feature: FeatureType, index: int, path: tuple) -> None:
    if value is None:
        return
    if isinstance(feature, dict):
        if not isinstance(value, Mapping):
            kind = type(value).__name__
            raise ValueError(f"row {index}: {_path_name(path)!r} should be a dict, got {kind}")
        _check_keys(value, feature, index, path)
        for key, sub_feature in feature.items():
            if _has_struct(sub_feature):
                _check_nested_keys(value[key], sub_feature, index, path + (key,))
    elif isinstance(feature, datasets.List):
        for position, item in enumerate(value):
            _check_nested_keys(item, feature.feature, index, path + (position,))


def _path_name(path: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else part
    return name


def _has_struct(feature: FeatureType) -> bool:
    if isinstance(feature, dict):
        return True
    return isinstance(feature, datasets.List) and _has_struct(feature.feature)


def _to_table(chunk: list[dict], schema: pa.Schema, first_index: int) -> pa.Table:
    try:
        return pa.Table.from_pylist(chunk, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{_locate_bad_value(chunk, schema, first_index)}: {err}") from err


def _locate_bad_value(chunk: list[dict], schema: pa.Schema, first_index: int) -> str:
    """Only on the error path: convert value by value to name the culprit."""
    for offset, row in enumerate(chunk):
        for column in schema:
            try:
                pa.array([row[column.name]], type=column.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return f"row {first_index + offset}: key {column.name!r}"
    return f"rows {first_index}..{first_index + len(chunk) - 1}"


def _write_parquet(path: Path, stream: _RowStream, rows: int, nbytes: int, schema: pa.Schema) -> int:
    """The next `rows` of `stream` as one Parquet file, a row group at a time; returns their Arrow size.

    Only one row group's rows are in memory at once, in blocks of the writer's 1,024-row
    batches counted from the row group's start: the file is then byte for byte what
    `write_table` of the whole table writes, however the rows came in parts (the same rows
    give the same file). An empty file gets no row group at all: `datasets` cannot read a
    0-row group. pyarrow stores no timestamps.
    """
    group_rows = max(1, rows if nbytes == 0 else rows * ROW_GROUP_BYTES // nbytes)
    arrow_bytes = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for group_start in range(0, rows, group_rows):
            size = min(group_rows, rows - group_start)
            blocks = [_fresh(stream.take(min(_WRITE_BATCH_ROWS, size - offset)))
                      for offset in range(0, size, _WRITE_BATCH_ROWS)]
            arrow_bytes += sum(block.nbytes for block in blocks)
            writer.write_table(pa.concat_tables(blocks), row_group_size=size)
    return arrow_bytes


def _fresh(pieces: list[pa.Table]) -> pa.Table:
    """`pieces` as one table of new, unsliced arrays (a slice's `nbytes` depends on where it was cut)."""
    return pa.concat_tables([*pieces, pieces[0].slice(0, 0)]).combine_chunks()


def _describe_file(root: Path, relpath: str, rows: int, arrow_bytes: int) -> _WrittenFile:
    path = root / relpath
    return _WrittenFile(
        relpath=relpath,
        rows=rows,
        arrow_bytes=arrow_bytes,
        file_bytes=path.stat().st_size,
        sha256=_sha256_file(path),
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(staging: Path, folder: Path) -> None:
    # Directories cannot be replaced in one rename: move the old one aside first and
    # delete it only once the new one is in place.
    if not folder.exists():
        staging.rename(folder)
        return
    retired = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(retired, ignore_errors=True)
    folder.rename(retired)
    try:
        staging.rename(folder)
    except BaseException:
        retired.rename(folder)
        raise
    shutil.rmtree(retired)


# --- manifest.json (README.md: see card.py) ------------------------------------


def _write_manifest(
    path: Path, features: datasets.Features, written: list[_WrittenFile], split: str
) -> str:
    checksum = hashlib.sha256("".join(w.sha256 for w in written).encode()).hexdigest()
    manifest = {
        "num_rows": sum(w.rows for w in written),
        "split": split,
        "files": [
            {"path": w.relpath, "rows": w.rows, "sha256": w.sha256, "bytes": w.file_bytes}
            for w in written
        ],
        "checksum": checksum,
        "features": features.to_dict(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return checksum


# --- reading back ------------------------------------------------------------------


def read_dataset_rows(folder: Path) -> list[dict]:
    """All rows of a published dataset, files in name order (for tests and reports)."""
    paths = sorted((Path(folder) / "data").glob("*.parquet"))
    return [row for path in paths for row in pq.read_table(path).to_pylist()]
