"""A manifest's input items, validated and streamed: inline entries, an input file or an input folder.

:class:`Inputs` (what :attr:`batchd.manifest.Manifest.inputs` gives) yields a job's items as the
task's ``Item`` model validates them, each with a string id (its position when it has none), and
raises :class:`~batchd.manifest.ManifestError` at the first bad item, at a duplicate id, or at the
end when there were none. The items come from

- entries listed inline in a task field (``texts``, ``items``);
- an input file next to the manifest: ``.csv`` or ``.tsv`` (a header row, its columns fed to item
  fields by ``id_column``, ``text_column`` and ``file_column``), ``.jsonl`` (a JSON object or
  string a line) or ``.txt`` (a text a non-blank line);
- an input folder of the inbox: an item per file, named by the file, which goes with its requests.

Why it reads them this way:

- **Items stream with constant memory.** An input file may hold millions of rows and is read anew
  on each pass over the items, never loaded whole. Records are validated a batch at a time, and
  the ids kept for the duplicate check move from a dict to a temporary SQLite database past
  :data:`SEEN_IN_MEMORY`.
- **Every read is bounded before anything large is built** (:class:`~batchd.manifest.ManifestLimits`,
  the ``[limits]`` settings). Anyone can drop a file into the inbox: a line is read at most
  ``line_chars`` characters at a time, a CSV row's values are counted before the csv module splits
  it, and a JSONL line is checked like a manifest (its values counted before it is parsed; nesting,
  digits, duplicate keys, NaN), so a hostile input is a rejection naming the limit, never a crash.
- **Errors name file, field and line** (``reviews.csv, line 12: text: …``, ``jobs.toml: items[2].id: …``).
  A pass stops at the first problem, after handing out the items before it: the same outcome
  whether records are checked one at a time or a batch at a time.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import BaseModel, TypeAdapter, ValidationError

from batchd.bounded import ManifestError, check_values, error_from_validation, field_path, json_value
from batchd.media import MediaError, describe_name

if TYPE_CHECKING:
    from batchd.manifest import CommonFields, Manifest, ManifestLimits


class Inputs:
    """A manifest's items as validated ``Item`` instances, each with a string id.

    Iteration streams inline entries or input-file rows and raises :class:`ManifestError` at the
    first bad item, at a duplicate id, or at the end when there were no items at all.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        #: The file of the item yielded last (a folder input, ``file_column``), relative to the inbox.
        self.file: str | None = None

    def __iter__(self) -> Iterator[BaseModel]:
        manifest = self._manifest
        task = manifest.task_plugin
        if manifest.input_folder is not None:
            records, ids_are_positions = _folder_records(manifest), False
        elif manifest.input_path is None:
            field, entries = task.inline_items(manifest.params) or ("", ())
            records, ids_are_positions = _inline_records(manifest.path, field, entries), False
        else:
            records, ids_are_positions = _file_records(manifest.input_path, manifest.common, task.Item,
                                                       manifest.limits)
        count = 0
        with _SeenIds(enabled=not ids_are_positions) as seen:
            # Validated and checked for duplicates a batch at a time (one pydantic call, one SQLite
            # statement), with the same outcome as record by record: the items before the first
            # bad record, then its error.
            for batch, unreadable in _batches(records, _BATCH):
                items, failure = _validate_batch(batch, task.Item)
                duplicate = seen.add_many([(item.id, record.location()) for item, record in zip(items, batch)])
                if duplicate is not None:
                    index, first_use = duplicate
                    yield from self._with_files(items[:index], batch)
                    raise batch[index].error(f"duplicate id {items[index].id!r} (first used at {first_use})",
                                             field="id")
                count += len(items)
                yield from self._with_files(items, batch)
                if failure is not None:
                    raise failure
                if unreadable is not None:
                    raise unreadable
        if count == 0:
            raise ManifestError(manifest.input_path or manifest.path, "no input items")

    def _with_files(self, items: list[BaseModel], batch: list[_Record]) -> Iterator[BaseModel]:
        for item, record in zip(items, batch):
            self.file = record.file
            yield item


# --- Records, validated a batch at a time ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    """One raw input item and where it was written, for error messages."""

    position: int  # 1-based; the item's id when it has none
    values: dict[str, Any]
    path: Path
    field_prefix: str = ""  # e.g. "items[2]" for inline items
    line: int | None = None  # for items read from files
    file: str | None = None  # the item's file, relative to the inbox (a folder input, file_column)

    def values_with_id(self) -> dict[str, Any]:
        """The values to validate: an item without an id gets its position."""
        values = self.values
        if values.get("id") in (None, ""):
            values = {**values, "id": str(self.position)}
        return values

    def validate(self, model: type[BaseModel]) -> BaseModel:
        try:
            return model.model_validate(self.values_with_id())
        except ValidationError as exc:
            raise error_from_validation(exc, self.path, prefix=self.field_prefix, line=self.line) from None

    def location(self) -> str:
        return self.field_prefix or f"line {self.line}"

    def error(self, message: str, *, field: str) -> ManifestError:
        return ManifestError(self.path, message, field=field_path((field,), self.field_prefix), line=self.line)


#: Records validated together: big enough to amortize the per-call costs, small enough for memory.
_BATCH = 256
#: Item ids kept in a dict for the duplicate check before they move to a temporary database (_SeenIds).
SEEN_IN_MEMORY = 1_000


def _batches(records: Iterable[_Record], size: int) -> Iterator[tuple[list[_Record], ManifestError | None]]:
    """Lists of up to ``size`` records; the last one comes with the error that stopped the reading, if any."""
    batch: list[_Record] = []
    try:
        for record in records:
            batch.append(record)
            if len(batch) == size:
                yield batch, None
                batch = []
    except ManifestError as error:  # the records read before it still count first
        yield batch, error
        return
    if batch:
        yield batch, None


@functools.lru_cache(maxsize=64)
def _list_adapter(model: type[BaseModel]) -> TypeAdapter:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def _validate_batch(batch: list[_Record], model: type[BaseModel]) -> tuple[list[BaseModel], ManifestError | None]:
    """The items of ``batch`` up to its first invalid record, and that record's error (or None)."""
    try:
        return _list_adapter(model).validate_python([record.values_with_id() for record in batch]), None
    except ValidationError:
        pass
    items = []  # some record is bad: find the first one, and its own error, one by one
    for record in batch:
        try:
            items.append(record.validate(model))
        except ManifestError as error:
            return items, error
    return items, None


# --- Inline entries and folder inputs --------------------------------------------------------------


def _inline_records(path: Path, field: str, entries: Sequence[Any]) -> Iterator[_Record]:
    for index, entry in enumerate(entries):
        if isinstance(entry, BaseModel):
            values = entry.model_dump(exclude_none=True)
        elif isinstance(entry, str):
            values = {"text": entry}
        else:
            values = dict(entry)
        yield _Record(position=index + 1, values=values, path=path, field_prefix=f"{field}[{index}]")


def _folder_records(manifest: Manifest) -> Iterator[_Record]:
    """One record per file of a folder input, by name (names starting with "." are left out): id and
    text the file's name, ``file`` its path. The folder is reached without following a symlink; what
    its entries are (a symlink, a FIFO, a huge file) is checked when each is read, failing its item only."""
    from batchd.media import _open_beneath

    where = manifest.media_dir / manifest.input_folder
    try:
        fd = _open_beneath(manifest.media_dir, tuple(manifest.input_folder.split("/")))
    except MediaError as error:
        raise ManifestError(manifest.path, f"the input folder {where}: {error}", field="input") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise ManifestError(manifest.path, f"the input {where} is not a folder", field="input")
        names = sorted(os.fsencode(name) for name in os.listdir(fd))
    finally:
        os.close(fd)
    position = 0
    for raw in names:
        if raw.startswith(b"."):
            continue
        name = os.fsdecode(raw)
        shown = describe_name(name)
        position += 1
        yield _Record(position=position, values={"id": shown, "text": shown}, path=where, line=None,
                      field_prefix=f"input[{shown!r}]", file=f"{manifest.input_folder}/{name}")


# --- Input files (CSV, TSV, JSONL, TXT), every read bounded ----------------------------------------


def _file_records(path: Path, common: CommonFields, item_model: type[BaseModel],
                  limits: ManifestLimits, file_base: str | None = None) -> tuple[Iterator[_Record], bool]:
    """The records of an input file, and whether their ids are all positions (hence unique)."""
    records, positions = _plain_file_records(path, common, item_model, limits)
    if not common.file_column:
        return records, positions
    return _with_file_column(records, path, common.file_column, file_base, "text" in item_model.model_fields), positions


def _with_file_column(records: Iterable[_Record], path: Path, column: str, file_base: str | None,
                      text_from_file: bool) -> Iterator[_Record]:
    """Records with their ``file`` taken from ``column`` (a path relative to the manifest's folder)."""
    for record in records:
        values = dict(record.values)
        file = values.pop(_FILE_FIELD, None)
        if not isinstance(file, str) or not file.strip():
            raise record.error(f"no file path in column {column!r}", field=column)
        if text_from_file and values.get("text") in (None, ""):
            values["text"] = file
        yield _Record(record.position, values, record.path, record.field_prefix, record.line,
                      file=file if file_base is None else f"{file_base}/{file}")


#: The record field a ``file_column`` feeds (no item field has this name).
_FILE_FIELD = "\0file"


def _plain_file_records(path: Path, common: CommonFields, item_model: type[BaseModel],
                        limits: ManifestLimits) -> tuple[Iterator[_Record], bool]:
    suffix = path.suffix.lower()
    renames = {common.id_column: "id", common.text_column: "text"}
    if common.file_column:
        renames[common.file_column] = _FILE_FIELD
    # An Item model that allows extra fields (a template's {column}s) takes every column.
    known_fields = _EveryField() if item_model.model_config.get("extra") == "allow" else item_model.model_fields.keys()
    if common.file_column:
        known_fields = _WithFileField(known_fields)
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        header = _csv_header(path, delimiter, limits)
        columns = _csv_columns(path, header, renames, common, item_model)
        return _csv_records(path, delimiter, columns, known_fields, limits), "id" not in columns
    if suffix == ".jsonl":
        return _jsonl_records(path, renames, known_fields, limits), False
    return _txt_records(path, limits), True


class _WithFileField:
    """A field-name set plus the ``file_column``'s field."""

    def __init__(self, fields) -> None:
        self._fields = fields

    def __contains__(self, name: object) -> bool:
        return name == _FILE_FIELD or name in self._fields


class _EveryField:
    """A field-name set that contains every named column."""

    def __contains__(self, name: object) -> bool:
        return name is not None


def _open_text(path: Path):
    # newline="" lets the csv module handle quoted line breaks; utf-8-sig drops a spreadsheet BOM.
    try:
        return path.open(encoding="utf-8-sig", newline="", buffering=1 << 20)  # fewer, larger reads
    except OSError as exc:  # unreadable (permissions, a folder): the job is rejected, not the daemon
        raise ManifestError(path, f"cannot read: {exc.strerror}") from None


def _target_field(name: str, renames: Mapping[str, str]) -> str | None:
    """The item field a CSV column or JSONL key feeds, or ``None`` to ignore it.

    A column named like a target ("id", "text") that is not its configured source is ignored
    rather than mixed up with the configured one.
    """
    if name in renames:
        return renames[name]
    return None if name in renames.values() else name


def _csv_reader(path: Path, file: TextIO, delimiter: str, limits: ManifestLimits):
    csv.field_size_limit(limits.line_chars)  # the csv module's own limit (process-wide) is 131,072
    lines = _bounded_lines(path, file, limits.line_chars)
    return csv.reader(_bounded_rows(path, lines, delimiter, limits.list_items), delimiter=delimiter)


_QUOTED = re.compile(r'"[^"]*(?:"|$)')


def _bounded_rows(path: Path, lines: Iterable[str], delimiter: str, limit: int) -> Iterator[str]:
    """``lines``, refusing a CSV row (the header included) of more than ``limit`` values before the csv
    module makes a string of each: a line of ``a,a,a,…`` is millions of them. The delimiters outside
    quotes are counted, a quoted field going on over several lines followed (``""`` inside one is two
    quotes, and keeps the count right)."""
    values, inside, row = 1, False, 1
    for number, line in enumerate(lines, start=1):
        if '"' not in line:
            values += 0 if inside else line.count(delimiter)
        else:
            values += _QUOTED.sub("", '"' + line if inside else line).count(delimiter)
            inside = (line.count('"') % 2 == 1) != inside
        if values > limit:
            what = "columns" if row == 1 else "values in one row"
            raise ManifestError(path, f"{values:,} {what}, more than {limit:,} ([limits] list_items)", line=number)
        yield line
        if not inside and line.endswith("\n"):
            values, row = 1, row + 1


def _csv_header(path: Path, delimiter: str, limits: ManifestLimits) -> list[str]:
    with _open_text(path) as f:
        try:
            header = next(_csv_reader(path, f, delimiter, limits), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"cannot read the header: {exc}", line=1) from None
    if len(header) > limits.list_items:
        raise ManifestError(path, f"{len(header):,} columns, more than {limits.list_items:,} ([limits] list_items)",
                            line=1)
    return header


def _csv_columns(
    path: Path, header: list[str], renames: Mapping[str, str], common: CommonFields, item_model: type[BaseModel]
) -> list[str | None]:
    """The item field each CSV column feeds (``None``: ignored), after checking required columns."""
    columns = [_target_field(name.strip(), renames) for name in header]
    source_name = {target: source for source, target in renames.items()}
    required = [name for name, field in item_model.model_fields.items() if field.is_required()]
    if common.file_column:  # the path is the text of an item without one
        required = [name for name in required if name != "text"] + [_FILE_FIELD]
    if "id_column" in common.model_fields_set:  # an id column asked for by name must exist
        required.append("id")
    missing = [source_name.get(name, name) for name in required if name not in columns]
    if missing:
        listed = ", ".join(repr(name) for name in header) or "none"
        raise ManifestError(path, f"missing column(s) {', '.join(map(repr, missing))} (columns: {listed})", line=1)
    return columns


def _csv_records(path: Path, delimiter: str, columns: list[str | None], known_fields: Iterable[str],
                 limits: ManifestLimits) -> Iterator[_Record]:
    wanted = [(index, name) for index, name in enumerate(columns) if name in known_fields]
    with _open_text(path) as f:
        reader = _csv_reader(path, f, delimiter, limits)
        try:
            next(reader, None)  # the header
            position = 0
            for row in reader:
                if not row:  # blank line
                    continue
                position += 1
                if len(row) > len(columns):
                    raise ManifestError(
                        path, f"row has {len(row)} values but the header has {len(columns)} columns", line=reader.line_num
                    )
                # Empty cells count as absent, so optional fields get their defaults.
                values = {name: row[index] for index, name in wanted if index < len(row) and row[index] != ""}
                yield _Record(position=position, values=values, path=path, line=reader.line_num)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"unreadable CSV: {exc}", line=reader.line_num) from None


def _jsonl_records(path: Path, renames: Mapping[str, str], known_fields: Iterable[str],
                   limits: ManifestLimits) -> Iterator[_Record]:
    for line_number, line in _numbered_lines(path, limits):
        value = json_value(path, line, limits, line=line_number)
        check_values(path, value, limits, line=line_number)
        if isinstance(value, str):
            values = {"text": value}
        elif isinstance(value, dict):
            fields = ((_target_field(key, renames), item) for key, item in value.items())
            values = {field: item for field, item in fields if field in known_fields}
        else:
            raise ManifestError(path, "each line must be a JSON object or string", line=line_number)
        yield _Record(position=line_number, values=values, path=path, line=line_number)


def _txt_records(path: Path, limits: ManifestLimits) -> Iterator[_Record]:
    for line_number, line in _numbered_lines(path, limits):
        yield _Record(position=line_number, values={"text": line}, path=path, line=line_number)


def _bounded_lines(path: Path, file: TextIO, limit: int) -> Iterator[str]:
    """``file``'s lines, refusing one longer than ``limit`` characters before more of it is read."""
    number = 0
    while line := file.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith("\n"):
            raise ManifestError(path, f"a line longer than {limit:,} characters ([limits] line_chars)", line=number)
        yield line


def _numbered_lines(path: Path, limits: ManifestLimits) -> Iterator[tuple[int, str]]:
    """Non-blank lines, stripped, with their 1-based line numbers."""
    line_number = 0
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_number, line in enumerate(_bounded_lines(path, f, limits.line_chars), start=1):
                if line.strip():
                    yield line_number, line.strip()
    except UnicodeDecodeError:
        raise ManifestError(path, "not valid UTF-8", line=line_number + 1) from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror}") from None


# --- Duplicate ids ---------------------------------------------------------------------------------


class _SeenIds:
    """Ids met so far, for duplicate detection without holding millions of ids in memory.

    The first :data:`SEEN_IN_MEMORY` ids are kept in a dict (most manifests hold a few items, and a
    temporary database costs a connection and four statements); past that they move to a temporary
    SQLite database, which keeps its pages in a small cache and spills to a temp file, so a
    million-row input costs a few MB at most.
    """

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._memory: dict[str, str] = {}
        self._db: sqlite3.Connection | None = None

    def add_many(self, entries: list[tuple[str, str]]) -> tuple[int, str] | None:
        """Record ``(item_id, location)`` pairs; for the first duplicate, its index and where it was first seen."""
        if not self._enabled or not entries:
            return None
        if self._db is None and len(self._memory) + len(entries) > SEEN_IN_MEMORY:
            self._spill()
        if self._db is None:
            for index, (item_id, location) in enumerate(entries):
                if item_id in self._memory:
                    return index, self._memory[item_id]
                self._memory[item_id] = location
            return None
        changes = self._db.total_changes
        self._db.execute("SAVEPOINT batch")
        self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", entries)
        if self._db.total_changes - changes == len(entries):
            self._db.execute("RELEASE batch")
            return None
        # A duplicate somewhere (maybe within the batch): undo the batch and find it pair by pair.
        self._db.execute("ROLLBACK TO batch")
        self._db.execute("RELEASE batch")
        for index, (item_id, location) in enumerate(entries):
            first_use = self.add(item_id, location)
            if first_use is not None:
                return index, first_use
        return None

    def add(self, item_id: str, location: str) -> str | None:
        """Record ``item_id``; return where it was first seen if it is a duplicate."""
        if not self._enabled:
            return None
        if self._db is None and len(self._memory) >= SEEN_IN_MEMORY:
            self._spill()
        if self._db is None:
            if item_id in self._memory:
                return self._memory[item_id]
            self._memory[item_id] = location
            return None
        inserted = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (item_id, location)).rowcount
        if inserted:
            return None
        return self._db.execute("SELECT location FROM seen WHERE id = ?", (item_id,)).fetchone()[0]

    def _spill(self) -> None:
        # "" = private temporary database on disk. check_same_thread=False: it belongs to one
        # generator, used by one thread at a time, but a generator may be closed (or collected)
        # on another thread than the one that started it, e.g. a build given up on.
        self._db = sqlite3.connect("", check_same_thread=False)
        self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, location TEXT) WITHOUT ROWID")
        self._db.executemany("INSERT INTO seen VALUES (?, ?)", self._memory.items())
        self._memory = {}

    def __enter__(self) -> _SeenIds:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._db is not None:
            self._db.close()
