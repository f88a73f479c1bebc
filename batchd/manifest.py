"""Job manifests: TOML or JSON files naming a task, its parameters and its input items.

A manifest has common fields (``task``, ``model``, generation settings, ``input``…) and the
task's own fields, validated by the task plugin's ``Params`` model. Items are either listed
inline (in a task field such as ``texts``) or read from an input file next to the manifest
(``.csv``, ``.tsv``, ``.jsonl``, ``.txt``). :mod:`batchd.inputs` streams the items, never loading an
input file whole.

Loading in place and after a claim::

    manifest = load_manifest(inbox / "reviews.toml", root=inbox)   # inputs confined to the inbox
    manifest.input_files()                                          # what to copy along
    ...
    manifest = load_manifest(job_dir / "manifest.toml", input_dir=job_dir / "inputs")
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from batchd.bounded import (ManifestError, check_value_count, check_values, error_from_validation, is_valid_text,
                            json_value, parse_limit_error)
from batchd.media import MediaError, MediaResolver
from batchd.task import FilePart, GenerationSettings, Task, TaskRequest, TaskResult
from batchd.task import _warnings as _task_warnings

if TYPE_CHECKING:
    from batchd.inputs import Inputs

ModelT = TypeVar("ModelT", bound=BaseModel)

MANIFEST_SUFFIXES = (".toml", ".json")
INPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".txt")



class ManifestLimits(BaseModel):
    """``[limits]``: what one manifest, and one line of its input file, may hold.

    Anyone can drop a file into the inbox: past a limit it is rejected with an error saying which,
    checked before anything large is built in memory, never a crash. The defaults fit real jobs:
    manifests are a few lines, and items past a few thousand belong in an input file, which streams.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_bytes: int = Field(4 * 2**20, ge=1024, description="Size of a manifest file, in bytes.")
    nesting: int = Field(
        64, ge=4, le=500, description="Arrays and tables inside each other, in a manifest or one JSONL line.")
    list_items: int = Field(
        10_000, ge=1, description="Entries of one list in a manifest (texts, items), and values of one CSV row "
                                  "(its header too), counted before the row is parsed.")
    line_chars: int = Field(
        16_000_000, ge=1024, description="One line of a JSONL or TXT input file, and one CSV field, in characters.")
    integer_digits: int = Field(32, ge=1, le=4300, description="Digits of a whole number in a manifest or JSONL line.")
    values: int = Field(
        200_000, ge=100,
        description="Values (texts, numbers, lists, tables and keys) in a manifest or one JSONL line, counted "
                    "before it is parsed: a few megabytes of `[{},{},…]` would otherwise take hundreds.")
    error_chars: int = Field(
        2000, ge=100, description="A rejection's message is cut here, with the full length said.")
    retry_keys_bytes: int = Field(
        64 * 2**20, ge=1024,
        description="Size of a retry's keys file (`batchd retry`), in bytes: its keys are held in memory while "
                    "the retry's requests are built.")


#: The limits :func:`load_manifest` applies unless it is given others (batchd's come from ``[limits]``).
DEFAULT_LIMITS = ManifestLimits()


class RetryOf(BaseModel):
    """``retry_of``: what makes a manifest a retry (``batchd retry``), sending again some requests of a job."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(min_length=1, max_length=200, description="Id of the job whose requests are sent again.")
    keys: str = Field(
        min_length=1,
        description="File next to the manifest (.jsonl) listing the keys of the requests to send, one JSON string a "
                    "line; the task's other requests are left out.",
    )


class CommonFields(GenerationSettings):
    """Manifest fields shared by every task (plus the generation settings)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="The task plugin that handles this manifest.")
    model: str | None = Field(None, min_length=1, description="Model name; defaults to the daemon's model.")
    input: str | None = Field(
        None,
        min_length=1,
        description="Input file next to the manifest (.csv, .tsv, .jsonl or .txt) instead of inline items; or a "
                    "folder of the inbox (PDFs, images, audio, video, text): one item per file, its id and text the "
                    "file's name, the file sent with the item's requests.",
    )
    id_column: str = Field("id", min_length=1, description="CSV column / JSONL key holding item ids.")
    text_column: str = Field("text", min_length=1, description="CSV column / JSONL key holding item text.")
    file_column: str | None = Field(
        None, min_length=1,
        description="CSV column / JSONL key holding a file's path (relative to the manifest's folder, inside the "
                    "inbox), sent with the item's requests; an item without a text gets the path as its text.")
    retry_of: RetryOf | None = Field(
        None, description="Written by `batchd retry`: the job retried, and the keys of the requests to send again.")
    cache: bool | None = Field(
        None, description="Answer each request identical to one answered before (same model, contents, settings and "
                          "schema) from the request cache instead of sending it, and keep this job's answers there; "
                          "defaults to the `cache` setting.")
    force: bool = Field(
        False, description="Run this manifest even when a job with the same content (the manifest's bytes and its"
                           " input file's) ran before; without it such a repeat is rejected as a duplicate, so"
                           " nothing is paid for twice by mistake. `batchd submit --force FILE` sets it.")


#: Names task plugins may not use for their own manifest fields, in declaration order.
COMMON_FIELDS: tuple[str, ...] = tuple(CommonFields.model_fields)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest. Build with :func:`load_manifest`."""

    path: Path
    task_plugin: Task
    common: CommonFields
    params: BaseModel
    #: The resolved input file, or ``None`` when items are inline.
    input_path: Path | None
    #: What its input file's lines may hold.
    limits: ManifestLimits = DEFAULT_LIMITS
    #: The resolved keys file of a retry (``retry_of.keys``), or ``None``.
    retry_keys_path: Path | None = None
    #: The folder file paths are relative to (the inbox), or None when unknown (then no file is read).
    media_dir: Path | None = None
    #: A folder input: its path relative to ``media_dir`` (``input_path`` is then None).
    input_folder: str | None = None
    #: What the task said with :func:`batchd.task.warn` during the last complete pass of :meth:`requests`.
    warnings: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.task_plugin.name

    @property
    def model(self) -> str | None:
        """The manifest's model, else its task's ``default_model`` (None: the daemon's ``model``)."""
        return self.common.model or self.task_plugin.default_model

    @property
    def kind(self) -> str:
        """``"generate"`` or ``"embed"``: what its requests are (see :attr:`batchd.task.Task.kind`)."""
        return self.task_plugin.kind

    def generation_config(self) -> dict[str, Any]:
        """The generation settings the manifest sets (for all its requests)."""
        return self.common.as_config()

    @property
    def inputs(self) -> Inputs:
        """The job's items, validated and streamed anew on each iteration."""
        from batchd.inputs import Inputs  # imported here: batchd.inputs imports this module

        return Inputs(self)

    def input_files(self) -> list[Path]:
        """Files the manifest reads (absolute paths): its input file, a retry's keys file; empty for inline items."""
        return [path for path in (self.input_path, self.retry_keys_path) if path is not None]

    def folder_fingerprint(self) -> str:
        """A hash of a folder input's entries (names, sizes, modification times; no file is read), so a
        manifest dropped again after its folder changed is not taken for a duplicate. Empty otherwise."""
        if self.input_folder is None or self.media_dir is None:
            return ""
        from batchd.media import _open_beneath

        digest = hashlib.sha256()
        try:
            fd = _open_beneath(self.media_dir, tuple(self.input_folder.split("/")))
        except MediaError:
            return ""
        try:
            for name in sorted(os.listdir(fd)):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                digest.update(os.fsencode(name) + f"\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            pass
        finally:
            os.close(fd)
        return digest.hexdigest()

    def check_inputs(self) -> int:
        """Read every item once (validation, duplicate ids, emptiness) and a retry's keys; return the item count."""
        if self.retry_keys_path is not None:
            read_retry_keys(self.retry_keys_path, self.limits)
        return sum(1 for _ in self.inputs)

    def requests(self, media: MediaResolver | None = None) -> Iterator[TaskRequest]:
        """The task's requests, each with its complete generation config.

        Precedence: the task's per-request config > the item's own ``config`` > the manifest's
        settings > the task's defaults. Each setting is taken whole from the first that sets it:
        ``thinking_config`` (the manifest's thinking_budget, thinking_level and include_thoughts)
        and the ``safety_settings`` list too, so a per-request thinking_config replaces the manifest's.
        A retry yields only the requests its keys file lists, and raises :class:`ManifestError` at
        the end if the task produced some listed key not at all.

        Files: an item's own file (a folder input, ``file_column``) goes with each of its requests,
        after the task's own :attr:`TaskRequest.files`. With ``media`` they are resolved into parts
        (:class:`batchd.media.MediaRef`); a file that cannot be sent gives its request an ``error``
        instead. Without it (a cost estimate) requests carry no files.
        """
        base_config = {**self.task_plugin.default_config, **self.generation_config()}
        items = _ItemConfigs(base_config)
        task_config, item_config, config = None, base_config, base_config
        # Keys are stable across runs of the same manifest and inputs (results are joined by them),
        # so filtering the task's requests retries exactly the listed ones, for any task.
        wanted = read_retry_keys(self.retry_keys_path, self.limits) if self.retry_keys_path is not None else None
        inputs = self.inputs
        # The task's warn() calls land in this pass's list (the plugin's generator runs in this thread).
        collected: list[str] = []
        _task_warnings.set(collected)
        for request in self.task_plugin.requests(self.params, items.following(inputs)):
            if wanted is not None:
                if request.key not in wanted:
                    continue
                wanted.discard(request.key)
            if request.config is not task_config or items.config is not item_config:
                # Tasks usually give every request the same config object, and items seldom have
                # their own: then requests share one merged config too, which lets the encoder
                # reuse its encoding by identity.
                task_config, item_config = request.config, items.config
                config = {**item_config, **task_config}
            files, error = (), None
            if media is not None and (request.files or inputs.file is not None):
                files, error = _resolved_files(request, inputs.file, media)
            # Built directly rather than with dataclasses.replace(): this runs once per row.
            yield TaskRequest(request.key, request.prompt, request.input, config, files, error)
        self.warnings[:] = collected
        if wanted:
            listed = ", ".join(repr(key) for key in itertools.islice(wanted, 3))
            raise ManifestError(self.retry_keys_path, f"the task makes no request of {len(wanted):,} listed key(s) "
                                                      f"from this manifest and input: {listed}"
                                                      f"{', …' if len(wanted) > 3 else ''}", field="retry_of.keys")

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        """The entries of ``organized.json`` for results given in request order."""
        return self.task_plugin.organize(results)


def _resolved_files(request: TaskRequest, item_file: str | None,
                    media: MediaResolver) -> tuple[tuple, dict | None]:
    """A request's files as parts, or no files and the error that keeps it from being sent."""
    parts = [*request.files]
    if item_file is not None and all(part.path != item_file for part in parts):
        parts.append(FilePart(item_file))
    try:
        return tuple(media.resolve(part.path, part.mime_type) for part in parts), None
    except MediaError as error:
        return (), {"code": "bad_file", "message": str(error)}


class _ItemConfigs:
    """The config of the item a task took last, which its next requests get.

    A task yields an item's requests before it takes the next item (streaming asks no more of
    it), so an item's own settings apply to the requests that follow it: nothing is kept per item.
    """

    def __init__(self, base_config: dict[str, Any]) -> None:
        self._base_config = base_config
        self._settings: GenerationSettings | None = None
        #: The base config with the current item's settings over it.
        self.config = base_config

    def following(self, items: Iterable[BaseModel]) -> Iterator[BaseModel]:
        """``items``, keeping :attr:`config` that of the one handed out last."""
        for item in items:
            settings = getattr(item, "config", None)
            if not isinstance(settings, GenerationSettings):  # an Item without ItemConfig (or its own `config`)
                settings = None
            if settings != self._settings:  # consecutive items with equal settings share one config
                self._settings = settings
                self.config = self._base_config if settings is None else {**self._base_config, **settings.as_config()}
            yield item


def load_manifest(
    path: Path,
    *,
    root: Path | None = None,
    base_dir: Path | None = None,
    input_dir: Path | None = None,
    tasks: Mapping[str, Task] | None = None,
    check_inputs: bool = True,
    content: bytes | None = None,
    limits: ManifestLimits = DEFAULT_LIMITS,
    media_dir: Path | None = None,
) -> Manifest:
    """Read and validate a manifest.

    :param root: folder input files must stay inside (the inbox); defaults to ``base_dir``.
    :param base_dir: folder relative input paths resolve against; defaults to the manifest's.
    :param input_dir: folder holding the input files themselves, found by file name; a claimed
        job keeps copies of its inputs there. Replaces ``base_dir`` and ``root``.
    :param tasks: task registry; defaults to the installed plugins' tasks.
    :param check_inputs: also read every input item now, so bad rows, duplicate ids and empty
        inputs are reported here. Pass ``False`` to defer that to the first pass over ``inputs``.
    :param content: the file's bytes, already read (through a checked descriptor: see
        :func:`batchd.inbox.read_entry`); ``path`` then only names it.
    :param limits: what the manifest and its input lines may hold.
    :param media_dir: the folder file paths (a folder input, ``file_column``) are relative to: the
        inbox. Defaults to ``root`` (or ``base_dir``) when the manifest is read in place.
    :raises ManifestError: its message not yet cut (see :meth:`ManifestError.capped`).
    """
    path = Path(path)
    if tasks is None:
        tasks = _registered_tasks()
    document = _read_document(path, content, limits)
    task = _select_task(path, document, tasks)
    common_values = {key: value for key, value in document.items() if key in COMMON_FIELDS}
    task_values = {key: value for key, value in document.items() if key not in COMMON_FIELDS}
    common = _validate(CommonFields, common_values, path)
    params = _validate(task.Params, task_values, path, task=task)
    _check_kind(path, task, common)

    inline = task.inline_items(params)
    if common.input and inline is not None:
        raise ManifestError(path, f"give either input or {inline[0]}, not both", field="input")
    if not common.input and inline is None:
        raise ManifestError(path, "no items: list them inline or name an input file (input = \"...\")")
    input_path = None
    if media_dir is None and input_dir is None:
        media_dir = Path(root) if root is not None else Path(base_dir) if base_dir is not None else path.parent
    input_folder = _input_folder(path, common.input, media_dir) if common.input else None
    if input_folder is not None:
        if common.file_column:
            raise ManifestError(path, "a folder input gives each item its file: file_column is for a CSV or JSONL "
                                      "input", field="file_column")
    elif common.input:
        if input_dir is not None:
            input_path = _confined_input(path, Path(common.input).name, input_dir, input_dir)
        else:
            base = Path(base_dir) if base_dir is not None else path.parent
            input_path = _confined_input(path, common.input, base, Path(root) if root is not None else base)
    retry_keys_path = None
    if common.retry_of is not None:
        keys = common.retry_of.keys
        if input_dir is not None:
            retry_keys_path = _confined_input(path, Path(keys).name, input_dir, input_dir, **_KEYS_FILE)
        else:
            base = Path(base_dir) if base_dir is not None else path.parent
            retry_keys_path = _confined_input(path, keys, base, Path(root) if root is not None else base, **_KEYS_FILE)
        if input_path is not None and retry_keys_path.name == input_path.name:
            # A claimed job keeps both in one folder, by file name.
            raise ManifestError(path, "the keys file and the input file need different file names",
                                field="retry_of.keys")
    if task.kind == "embed" and (input_folder is not None or common.file_column):
        raise ManifestError(path, f"task {task.name!r} makes embeddings of texts: it takes no files (a folder "
                                  f"input or file_column)", field="file_column" if common.file_column else "input")
    if common.file_column and input_path is None and input_folder is None:
        raise ManifestError(path, "file_column names a column of the input file: give input = \"...\"",
                            field="file_column")
    manifest = Manifest(path=path, task_plugin=task, common=common, params=params, input_path=input_path,
                        limits=limits, retry_keys_path=retry_keys_path, media_dir=media_dir,
                        input_folder=input_folder)
    if check_inputs:
        manifest.check_inputs()
    return manifest


def manifest_json_schema(tasks: Mapping[str, Task] | None = None) -> dict[str, Any]:
    """JSON Schema of manifests: one alternative per registered task, chosen by ``task``."""
    if tasks is None:
        tasks = _registered_tasks()
    variants = [_combined_model(tasks[name]) for name in sorted(tasks)]
    if not variants:
        raise ValueError("no tasks are registered")
    if len(variants) == 1:
        schema = variants[0].model_json_schema()
    else:
        union = Annotated[Union[tuple(variants)], Field(discriminator="task")]  # noqa: UP007
        schema = TypeAdapter(union).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "batchd job manifest",
        **schema,
    }


# --- Reading and validating the manifest document ----------------------------------------------


def _registered_tasks() -> Mapping[str, Task]:
    # Imported here because batchd.plugins imports this module (for COMMON_FIELDS).
    from batchd.plugins import get_tasks

    return get_tasks()


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_document(path: Path, data: bytes | None, limits: ManifestLimits) -> dict[str, Any]:
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ManifestError(path, f"unsupported manifest type (use {' or '.join(MANIFEST_SUFFIXES)})")
    if data is None:
        try:
            # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of blocking the command.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ManifestError(path, "not a regular file (a manifest is read from a file, not a device, "
                                              "FIFO or folder)")
                data = file.read(limits.manifest_bytes + 1)
        except OSError as exc:
            raise ManifestError(path, f"cannot read: {exc.strerror}") from None
    if len(data) > limits.manifest_bytes:
        raise ManifestError(path, f"larger than {limits.manifest_bytes:,} bytes ([limits] manifest_bytes): list "
                                  f"many items in an input file (input = \"items.jsonl\"), which is read as a stream")
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM left by Windows editors
    except UnicodeDecodeError as exc:
        raise ManifestError(path, "not valid UTF-8", line=data.count(b"\n", 0, exc.start) + 1) from None
    if not text.strip():
        raise ManifestError(path, "the file is empty")
    check_value_count(path, text, limits, toml=path.suffix.lower() == ".toml")
    if path.suffix.lower() == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _toml_error(path, exc, text) from None
        except (RecursionError, ValueError) as exc:
            raise parse_limit_error(path, exc, limits) from None
    else:
        document = json_value(path, text, limits)
        if not isinstance(document, dict):
            raise ManifestError(path, "a JSON manifest must be an object")
    check_values(path, document, limits)
    return document


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError, text: str) -> ManifestError:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the position ends its message.
    message = str(exc)
    position = _TOML_POSITION.search(message)
    if position is None:  # "(at end of document)": typically a file cut short
        return ManifestError(path, f"invalid TOML: {message}", line=text.count("\n") + 1)
    return ManifestError(
        path, f"invalid TOML: {message[: position.start()]}", line=int(position[1]), column=int(position[2])
    )


def _select_task(path: Path, document: Mapping[str, Any], tasks: Mapping[str, Task]) -> Task:
    known = f"known tasks: {', '.join(sorted(tasks)) or 'none installed'}"
    name = document.get("task")
    if name is None:
        raise ManifestError(path, f"required field is missing ({known})", field="task")
    if not isinstance(name, str) or name not in tasks:
        raise ManifestError(path, f"unknown task {name!r} ({known})", field="task")
    return tasks[name]


def is_embedding_model(model: str) -> bool:
    """Whether a model name is an embedding model's (gemini-embedding-001, text-embedding-004, …):
    those only embed, every other Gemini model only generates."""
    return "embedding" in model.removeprefix("models/")


def _check_kind(path: Path, task: Task, common: CommonFields) -> None:
    """An embed task takes an embedding model and no generation settings; a generation task the reverse."""
    if task.kind == "embed":
        settings = sorted(common.as_config())
        if settings:
            raise ManifestError(path, f"task {task.name!r} makes embeddings, which take no generation settings "
                                      f"(remove {', '.join(settings)})", field=settings[0])
        if common.model and not is_embedding_model(common.model):
            raise ManifestError(path, f"{common.model!r} is a generation model and cannot embed: task "
                                      f"{task.name!r} needs an embedding model, such as gemini-embedding-001",
                                field="model")
    elif common.model and is_embedding_model(common.model):
        raise ManifestError(path, f"{common.model!r} is an embedding model and cannot generate text for task "
                                  f"{task.name!r}", field="model")


def _validate(model: type[ModelT], values: Mapping[str, Any], path: Path, *, task: Task | None = None) -> ModelT:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        unknown = "unknown field"
        if task is not None:  # a top-level field of the manifest: say what it takes
            own = ", ".join(task.Params.model_fields)
            unknown = f"unknown field (task {task.name!r} takes: {own}; and the common fields: {', '.join(COMMON_FIELDS)})"
        raise error_from_validation(exc, path, unknown_top_field=unknown) from None


#: How :func:`_confined_input` checks a retry's keys file.
_KEYS_FILE = {"field": "retry_of.keys", "what": "keys file", "suffixes": (".jsonl",)}


def _input_folder(manifest_path: Path, reference: str, media_dir: Path | None) -> str | None:
    """The folder an ``input`` names, relative to the inbox, or None when it names a file."""
    if media_dir is None or "\0" in reference:
        return None
    parts = Path(reference).parts
    if not reference.endswith("/") and not os.path.isdir(media_dir / reference):
        return None
    if Path(reference).is_absolute() or ".." in parts or not parts:
        raise ManifestError(manifest_path, f"{reference!r}: give a folder inside the inbox, relative to the manifest "
                                           f"(no '..')", field="input")
    if os.path.islink(media_dir / Path(*parts)) or not os.path.isdir(media_dir / Path(*parts)):
        raise ManifestError(manifest_path, f"input folder not found (or a symlink, which batchd never follows): "
                                           f"{media_dir / reference}", field="input")
    return "/".join(parts)


def _confined_input(manifest_path: Path, reference: str, base: Path, root: Path, *, field: str = "input",
                    what: str = "input file", suffixes: tuple[str, ...] = INPUT_SUFFIXES) -> Path:
    """The input file ``reference`` names (or another file the manifest reads), checked to exist inside ``root``."""
    if "\0" in reference:
        raise ManifestError(manifest_path, f"the {what} name contains a NUL character", field=field)
    try:
        # Relative to the manifest's folder, never to a home directory (``~user`` is a plain name here).
        candidate = (base / reference).resolve()
        found = candidate.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ManifestError(manifest_path, f"the {what} cannot be looked up: {reason}", field=field) from None
    if not candidate.is_relative_to(root.resolve()):
        raise ManifestError(manifest_path, f"{reference!r} is outside the inbox ({root})", field=field)
    if candidate.suffix.lower() not in suffixes:
        kind = what.split()[0]
        raise ManifestError(
            manifest_path, f"unsupported {kind} type {candidate.suffix!r} (use {', '.join(suffixes)})", field=field,
        )
    if not found:
        problem = "is not a regular file" if os.path.lexists(candidate) else "not found"  # (a FIFO, a folder...)
        raise ManifestError(manifest_path, f"{what} {problem}: {candidate}", field=field)
    return candidate


def read_retry_keys(path: Path, limits: ManifestLimits = DEFAULT_LIMITS) -> set[str]:
    """The keys a retry's keys file lists: one JSON string a line (any key, even one with a line break).

    The file is opened without following a symlink and checked through that descriptor (a regular
    file no larger than ``retry_keys_bytes``); what was checked is what is read.
    """
    try:
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of blocking.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        reason = "a symlink: batchd never follows one" if exc.errno == errno.ELOOP else exc.strerror
        raise ManifestError(path, f"cannot read the keys file: {reason}", field="retry_of.keys") from None
    with open(fd, "rb", buffering=1 << 20) as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(path, "the keys file is not a regular file", field="retry_of.keys")
        if st.st_size > limits.retry_keys_bytes:
            raise ManifestError(path, f"the keys file is larger than {limits.retry_keys_bytes:,} bytes ([limits] "
                                      f"retry_keys_bytes)", field="retry_of.keys")
        keys: set[str] = set()
        left = limits.retry_keys_bytes  # a file that grows after the check is still read no further
        for number, line in enumerate(iter(lambda: file.readline(left + 1), b""), start=1):
            left -= len(line)
            if left < 0:
                raise ManifestError(path, f"the keys file is larger than {limits.retry_keys_bytes:,} bytes "
                                          f"([limits] retry_keys_bytes)", field="retry_of.keys")
            if not line.strip():
                continue
            try:
                key = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                key = None
            if not isinstance(key, str) or not is_valid_text(key):
                raise ManifestError(path, "each line of a keys file must be one JSON string (a request key)",
                                    field="retry_of.keys", line=number)
            keys.add(key)
    if not keys:
        raise ManifestError(path, "the keys file lists no key", field="retry_of.keys")
    return keys


def _combined_model(task: Task) -> type[BaseModel]:
    """A model of one task's whole manifest (for the JSON Schema only)."""
    title = "".join(part.capitalize() for part in task.name.split("_")) + "Manifest"
    fields: dict[str, Any] = {
        "task": (Literal[task.name], Field(description="The task plugin that handles this manifest.")),
    }
    if task.default_model:
        fields["model"] = (str | None, Field(None, min_length=1,
                                             description=f"Model name; defaults to {task.default_model}."))
    if task.kind == "embed":
        # Embeddings take no generation settings nor files (refused at load): the schema leaves them out.
        common = {name: (info.annotation, info) for name, info in CommonFields.model_fields.items()
                  if name not in GenerationSettings.model_fields and name != "file_column"}
        return create_model(title, __base__=task.Params, __doc__=task.description or None, **{**common, **fields})
    return create_model(
        title,
        __base__=(task.Params, CommonFields),  # common fields first in the schema
        __doc__=task.description or None,
        **fields,
    )
