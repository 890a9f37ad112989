"""A run's finished shards' rows, on disk until the run publishes them.

A flow used to hold every finished shard's rows until it published them, so its memory grew
with the run (~27 MB a thousand problems even with one-line answers). Instead each shard's
rows are checked and converted as the Parquet writer would (`checked_table`) when the shard
finishes, and written to `<state_dir>/spool/<dataset>/<shard index>.arrow` (Arrow IPC); at
the end `publish_dataset` streams them back in shard order, one Parquet row group at a time.
The folder is emptied when a run starts and removed once the run has published.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

if TYPE_CHECKING:
    import pyarrow as pa

    from flows.publishing.parquet import CheckedTables


class RowSpool:
    def __init__(self, folder: Path, models: Mapping[str, type[pydantic.BaseModel]]) -> None:
        self.folder = Path(folder)
        self.models = dict(models)  # dataset name -> the model of its rows
        # dataset -> shard index -> (rows, Arrow bytes)
        self._sizes: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in self.models}

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._sizes = {name: {} for name in self.models}

    def add(self, index: int, rows: Mapping[str, Sequence[pydantic.BaseModel]]) -> None:
        """Shard `index`'s rows of each dataset (a shard added again replaces its rows)."""
        import pyarrow as pa

        from flows.publishing.parquet import checked_table, features_for

        for name, dataset_rows in rows.items():
            try:
                table = checked_table(dataset_rows, features_for(self.models[name]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name} of shard {index}: {exc}") from exc
            path = self._path(name, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".tmp-{os.getpid()}")
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(partial, path)
            self._sizes[name][index] = (table.num_rows, table.nbytes)

    def rows(self, name: str) -> CheckedTables:
        """Dataset `name`'s spooled rows, for `publish_dataset`, in shard order, each shard read
        when its rows are written."""
        from flows.publishing.parquet import CheckedTables, TablePart

        return CheckedTables([TablePart(rows, nbytes, functools.partial(self._read, name, index))
                              for index, (rows, nbytes) in sorted(self._sizes[name].items())])

    def _read(self, name: str, index: int) -> pa.Table:
        import pyarrow as pa

        with pa.OSFile(str(self._path(name, index))) as source:
            return pa.ipc.open_file(source).read_all()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, name: str, index: int) -> Path:
        return self.folder / name / f"{index:05d}.arrow"
