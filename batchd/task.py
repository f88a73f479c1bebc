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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator


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


class GenerationSettings(BaseModel):
    """Generation settings, named as in google-genai's ``GenerateContentConfig``.

    A manifest may set these for all its requests; a task may set them per request in
    :attr:`TaskRequest.config` (which also admits ``response_mime_type`` and
    ``response_json_schema``).
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

    def as_config(self) -> dict[str, Any]:
        """The generation settings that are set, as a request config dict."""
        # `include` keeps subclasses' own fields (such as a manifest's `task`) out.
        return self.model_dump(include=set(GenerationSettings.model_fields), exclude_none=True)


class TextItem(BaseModel):
    """An input item that is a piece of text, optionally with an id.

    Items without an id get their 1-based position (index in an inline list, data row of a CSV
    file, line of a .txt/.jsonl file) when batchd reads them.
    """

    model_config = ConfigDict(extra="forbid")

    id: ItemId | None = Field(None, description="Stable id; defaults to the item's 1-based position.")
    text: str = Field(description="The text.")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty")
        return text


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
class TaskRequest:
    """One model request built by a task."""

    #: Stable and unique within the job; results are joined back by it.
    key: str
    #: The user text sent as the request's contents.
    prompt: str
    #: Fields echoed into ``results.jsonl`` so each result says what it answers.
    input: dict[str, Any]
    #: Generation settings for this request (snake_case SDK names, see GenerationSettings);
    #: they win over the manifest's, which win over ``Task.default_config``. Read-only once
    #: handed over: a task may give every request the same dict (batchd then merges and
    #: encodes it once), but must not change a dict it has already yielded.
    config: dict[str, Any] = field(default_factory=dict)


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
    #: One input item, from an inline list or a row of an input file. Must have an ``id`` field.
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
        """Yield the requests for these validated ``Item`` instances (each has a string id)."""
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
