"""The task plugin API: what a task plugin implements and the values it exchanges with batchd.

A task turns a manifest's parameters and input items into model requests, and turns the joined
results back into the entries of ``organized.json``. Plugins register :class:`Task` instances
through the ``register_tasks`` hook (see :mod:`batchd.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from batchd import sdk_enums

import contextvars

#: Where :func:`warn` puts a job's warnings while batchd reads its requests (None: nowhere).
_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("batchd_task_warnings", default=None)

#: A job keeps this many warnings from its task at most (each cut at WARNING_CHARS).
MAX_WARNINGS = 20
WARNING_CHARS = 1000


def warn(message: str) -> None:
    """Say something about a job that its owner should read, from a task's ``requests()``: what was
    dropped or changed (a repeated text translated once, ...). batchd logs it as a WARNING line and
    lists it in the job's ``summary.json`` ``warnings``. Say how many and which (a few examples)."""
    collected = _warnings.get()
    if collected is not None and len(collected) < MAX_WARNINGS:
        text = str(message)
        collected.append(text if len(text) <= WARNING_CHARS else text[:WARNING_CHARS] + "…")


def examples(values: Iterable[Any], total: int, shown: int = 5, chars: int = 60) -> str:
    """``'a', 'b', 'c' and 4 more``: a few of ``values`` (each cut at ``chars``) for a warning."""
    listed = []
    for value in values:
        if len(listed) == shown:
            break
        text = str(value)
        listed.append(repr(text if len(text) <= chars else text[:chars] + "…"))
    more = total - len(listed)
    return ", ".join(listed) + (f" and {more:,} more" if more > 0 else "")


def _number_to_str(value: Any) -> Any:
    # TOML and JSON users write `id = 7`; ids are strings everywhere else (keys, JSON objects).
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


#: An input item's id: a non-empty string; integers are accepted and converted.
ItemId = Annotated[
    str,
    BeforeValidator(_number_to_str),
    Field(min_length=1, max_length=256),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256}, {"type": "integer"}]}),
]


#: The largest thinking budget a Gemini model takes (2.5 Pro: 32,768 tokens; 2.5 Flash: 24,576).
MAX_THINKING_BUDGET = 32_768


def _sdk_enum(name: str, prefix: str = "") -> Any:
    """A value of google-genai's enum ``name``, as its wire value: given in any case and, with a
    ``prefix``, with or without it (``"low"`` is ``"MEDIA_RESOLUTION_LOW"``)."""
    values = sdk_enums.values(name)

    def wire_value(value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            if not value.startswith(prefix):
                value = prefix + value
        return value

    # The schema (editors, docs/manifests.md) offers the short lower-case forms beside the wire values.
    short_forms = [value.removeprefix(prefix).lower() for value in values]
    return Annotated[Literal[values], BeforeValidator(wire_value),
                     WithJsonSchema({"type": "string", "enum": [*values, *short_forms]})]


ThinkingLevel = _sdk_enum("ThinkingLevel")
MediaResolution = _sdk_enum("MediaResolution", prefix="MEDIA_RESOLUTION_")
Modality = _sdk_enum("Modality")
HarmCategory = _sdk_enum("HarmCategory", prefix="HARM_CATEGORY_")
HarmBlockThreshold = _sdk_enum("HarmBlockThreshold")

#: The settings that make up the request's one ``thinking_config``.
THINKING_FIELDS = ("thinking_budget", "thinking_level", "include_thoughts")


class SafetySetting(BaseModel):
    """One ``[[safety_settings]]`` entry: from which probability of harm of a category answers are blocked."""

    model_config = ConfigDict(extra="forbid")

    category: HarmCategory = Field(description='Harm category, e.g. "HARM_CATEGORY_HATE_SPEECH" or "hate_speech".')
    threshold: HarmBlockThreshold = Field(description='e.g. "BLOCK_ONLY_HIGH", "BLOCK_NONE" or "OFF" (any case).')


class GenerationSettings(BaseModel):
    """Generation settings, named as in google-genai's ``GenerateContentConfig``.

    A manifest may set these for all its requests, an input item for its own (its ``config``
    table); a task may set them per request in :attr:`TaskRequest.config` (which also admits
    ``response_mime_type`` and ``response_json_schema``). Enum values are google-genai's, in any case.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling probability mass.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens.")
    max_output_tokens: int | None = Field(None, ge=1, description="Longest answer, in tokens.")
    system_instruction: str | None = Field(None, min_length=1, description="System instruction text.")
    stop_sequences: list[str] | None = Field(None, description="Stop generating at any of these.")
    seed: int | None = Field(None, description="Seed for more repeatable sampling.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Penalize tokens already used.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Penalize tokens by how often used.")
    thinking_budget: int | None = Field(
        None, ge=-1, le=MAX_THINKING_BUDGET,
        description=f"Thinking tokens (Gemini 2.5): -1 the model decides, 0 no thinking, N (up to "
                    f"{MAX_THINKING_BUDGET:,}) at most N. Not with thinking_level.")
    thinking_level: ThinkingLevel | None = Field(
        None, description="How much to think (Gemini 3), in any case. Not with thinking_budget.")
    include_thoughts: bool | None = Field(None, description="Answers start with a summary of the thinking.")
    media_resolution: MediaResolution | None = Field(
        None, description='Resolution images and video are read at; "low", "medium", "high" for short.')
    response_modalities: list[Modality] | None = Field(
        None, min_length=1, description="What answers may hold, in any case.")
    safety_settings: list[SafetySetting] | None = Field(
        None, min_length=1, description="Block thresholds, at most one entry per harm category.")

    @field_validator("thinking_level")
    @classmethod
    def _not_with_a_budget(cls, level: str | None, info: ValidationInfo) -> str | None:
        if level is not None and info.data.get("thinking_budget") is not None:
            raise ValueError("give thinking_budget or thinking_level, not both: Google refuses a request with "
                             "both (thinking_level is for Gemini 3 models, thinking_budget for Gemini 2.5)")
        return level

    @field_validator("safety_settings")
    @classmethod
    def _one_entry_per_category(cls, settings: list[SafetySetting] | None) -> list[SafetySetting] | None:
        seen: set[str] = set()
        for setting in settings or ():
            if setting.category in seen:
                raise ValueError(f"{setting.category} is given more than once")
            seen.add(setting.category)
        return settings

    def as_config(self) -> dict[str, Any]:
        """The generation settings that are set, as a request config dict: SDK names, with the
        thinking fields in one ``thinking_config`` (which google-genai sends as is)."""
        # `include` keeps subclasses' own fields (such as a manifest's `task`) out.
        config = self.model_dump(include=set(GenerationSettings.model_fields), exclude_none=True)
        thinking = {name: config.pop(name) for name in THINKING_FIELDS if name in config}
        if thinking:
            config["thinking_config"] = thinking
        return config


#: An item's own generation settings, over the manifest's; an ``Item`` model with this ``config``
#: field lets its items carry them (see :meth:`batchd.manifest.Manifest.requests`).
ItemConfig = Annotated[
    GenerationSettings | None,
    Field(description="This item's own generation settings, over the manifest's: a table of the same fields "
                      "(an object in a JSONL line)."),
]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


#: An item's text: any string but a blank one (for an ``Item`` of your own, as :data:`ItemId` is).
ItemText = Annotated[str, AfterValidator(_not_blank)]


class TextItem(BaseModel):
    """An input item that is a piece of text, optionally with an id.

    Items without an id get their 1-based position (index in an inline list, data row of a CSV
    file, line of a .txt/.jsonl file) when batchd reads them.
    """

    model_config = ConfigDict(extra="forbid")

    id: ItemId | None = Field(None, description="Stable id; defaults to the item's 1-based position.")
    text: ItemText = Field(description="The text.")
    config: ItemConfig = None


class TextsParams(BaseModel):
    """Manifest fields of a task over texts: ``items`` (with ids) or ``texts``, or neither when the
    manifest names an ``input`` file. A :class:`TextTask`'s ``Params`` subclass it with their own fields."""

    model_config = ConfigDict(extra="forbid")

    items: list[TextItem] | None = Field(None, min_length=1, description="Texts with ids.")
    texts: list[str] | None = Field(None, min_length=1, description="Texts; ids are their 1-based positions.")

    @model_validator(mode="after")
    def _one_item_list(self) -> TextsParams:
        if self.items is not None and self.texts is not None:
            raise ValueError("give either items or texts, not both")
        return self


@dataclass(frozen=True, slots=True)
class FilePart:
    """A file sent to the model with a request (a PDF, an image, audio, video, text): see
    :attr:`TaskRequest.files` and docs/plugins.md, "Files"."""

    #: The file's path relative to the inbox (the manifest's folder), as a manifest would give it:
    #: batchd opens it without following a symlink and refuses a path leading out of the inbox.
    path: str
    #: Its MIME type; None: by its extension, else by its first bytes.
    mime_type: str | None = None


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """One model request built by a task."""

    #: Stable and unique within the job; results are joined back by it.
    key: str
    #: The user text sent as the request's contents.
    prompt: str
    #: Fields echoed into ``results.jsonl`` so each result says what it answers.
    input: dict[str, Any]
    #: Generation settings for this request (snake_case SDK names, see GenerationSettings);
    #: they win over the item's own ``config``, then the manifest's, then ``Task.default_config``. Read-only once
    #: handed over: a task may give every request the same dict (batchd then merges and
    #: encodes it once), but must not change a dict it has already yielded.
    config: dict[str, Any] = field(default_factory=dict)
    #: Files sent before the prompt text, as ``inlineData`` (small) or ``fileData`` (uploaded once
    #: through the Files API) parts. An item's own file (a folder input, ``file_column``) is added by
    #: batchd to each of its requests: a task lists here only files of its own choosing.
    files: tuple[FilePart, ...] = ()
    #: Set by batchd, never by a task: why this request cannot be sent (a file that is missing, too
    #: large, of a type the model does not read). It is not sent; its result is this error.
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class TaskResult:
    """One request's outcome, handed back to :meth:`Task.organize` in request order."""

    key: str
    input: dict[str, Any]
    status: Literal["ok", "error"]
    text: str | None = None
    #: Parsed JSON when the request asked for JSON and the answer parsed.
    data: Any | None = None
    #: ``{"code": int, "message": str}`` for a failed request.
    error: dict[str, Any] | None = None
    #: An embedding request's vector (an ``embed`` task's result; see :attr:`Task.kind`).
    embedding: list[float] | None = None
    #: That vector's row in the outbox's ``embeddings.npy``, set by batchd before ``organize()`` sees it.
    embedding_row: int | None = None
    #: The response's usageMetadata.
    usage: dict[str, Any] | None = None
    #: How the answer was matched to its request: ``"key"``, or ``"position"`` when the service
    #: returned an inline answer without its key (see the outbox's results.jsonl).
    joined_by: Literal["key", "position"] = "key"
    #: The model's summary of its thinking, when the request asked for it (``include_thoughts``).
    thoughts: str | None = None
    #: Whether the answer came from the request cache (``cache = true``) instead of the service.
    cached: bool = False

    def failure(self) -> str | None:
        """Why this result has no usable text, or ``None`` when it has some."""
        if self.status != "ok":
            return (self.error or {}).get("message") or "request failed"
        if self.embedding is not None:
            return None
        if not self.text or not self.text.strip():
            return "empty response"
        return None


def error_entry(message: str) -> dict[str, str]:
    """The value organize() puts where an answer is missing, so failures never vanish."""
    return {"error": message}


class Task:
    """Base class of task plugins.

    Subclasses set the class attributes and implement :meth:`requests` and :meth:`organize`.
    """

    #: The manifest's ``task = "..."`` value.
    name: ClassVar[str]
    #: One line shown by ``batchd plugins`` and in the manifest JSON Schema.
    description: ClassVar[str] = ""
    #: The task's own manifest fields. Must use ``extra="forbid"`` so typos are reported.
    Params: ClassVar[type[BaseModel]]
    #: One input item, from an inline list or a row of an input file. Must have an ``id`` field; a
    #: ``config: ItemConfig`` field lets items carry their own generation settings.
    Item: ClassVar[type[BaseModel]] = TextItem
    #: Generation settings the task works best with; the manifest's settings override them.
    default_config: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: What its requests are: ``"generate"`` (GenerateContentRequests, answered with text) or
    #: ``"embed"`` (EmbedContentRequests sent with ``batches.create_embeddings``, answered with vectors
    #: that batchd writes to the outbox's ``embeddings.npy``). An embed task's ``TaskRequest.config``
    #: holds EmbedContentConfig settings (``task_type``, ``output_dimensionality``, ``title``), the same
    #: for every request of a job (an inline batch of embeddings has one config), and the manifest's
    #: generation settings are refused.
    kind: ClassVar[Literal["generate", "embed"]] = "generate"
    #: The model its jobs use when the manifest names none, instead of the daemon's ``model`` setting
    #: (an embed task needs an embedding model).
    default_model: ClassVar[str | None] = None

    def inline_items(self, params: BaseModel) -> tuple[str, Sequence[Any]] | None:
        """The manifest field holding inline items and its list, or ``None`` if it has none.

        Entries may be strings (taken as ``text``), mappings or ``Item`` instances. When this
        returns ``None`` the manifest must name an ``input`` file instead.
        """
        return None

    def requests(self, params: BaseModel, items: Iterable[BaseModel]) -> Iterator[TaskRequest]:
        """Yield the requests for these validated ``Item`` instances (each has a string id).

        Yield an item's requests before taking the next item: an item's own ``config`` applies to
        the requests yielded after it is taken.
        """
        raise NotImplementedError

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        """Yield the top-level ``(key, value)`` entries of ``organized.json``, each key once."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task {self.name!r}>"


class TextTask(Task):
    """A task over texts, with :class:`TextItem` items given inline as ``items`` or ``texts``
    (its ``Params`` subclass :class:`TextsParams`) or read from the manifest's ``input`` file."""

    Params: ClassVar[type[TextsParams]] = TextsParams

    def inline_items(self, params: TextsParams) -> tuple[str, Sequence[Any]] | None:
        if params.items is not None:
            return "items", params.items
        if params.texts is not None:
            return "texts", params.texts
        return None  # then the manifest names an input file: input = "reviews.csv"
