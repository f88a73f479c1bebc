"""Embed texts with a Gemini embedding model, at the Batch API's half price.

The vectors go to ``embeddings.npy`` in the job's outbox folder (float32, one row per text that
was embedded, in input order) with ``embeddings_index.jsonl`` (``{"row", "key"}``, the key being
the item's id). organized.json: ``{item id: {"row": n}}``, or ``{"error": ...}`` for a text that
was not embedded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batchd import hookimpl
from batchd.task import ItemId, ItemText, TaskRequest, TaskResult, TextsParams, TextTask, error_entry

# The Gemini API's TaskType values (https://ai.google.dev/api/embeddings#tasktype). google-genai 3.x
# types EmbedContentConfig.task_type as a plain string, with no enum to take them from, so a typo
# would only be refused by the service, for every text of the job, hours later.
TaskType = Literal["RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION", "CLUSTERING",
                   "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY"]

#: The largest embedding the Gemini embedding models return (gemini-embedding-001: 3072).
MAX_DIMENSIONALITY = 3072


class EmbedItem(BaseModel):
    """A text to embed, with an optional id. Unlike a TextItem it takes no ``config`` table: an
    embedding has no generation settings, so one given is an unknown field, reported at once."""

    model_config = ConfigDict(extra="forbid")

    id: ItemId | None = Field(None, description="Stable id; defaults to the item's 1-based position.")
    text: ItemText = Field(description="The text to embed.")


class EmbedParams(TextsParams):
    items: list[EmbedItem] | None = Field(None, min_length=1, description="Texts with ids.")
    task_type: TaskType | None = Field(
        None, description="What the embeddings are for, e.g. RETRIEVAL_DOCUMENT or SEMANTIC_SIMILARITY; "
                          "the model's default when not set.")
    output_dimensionality: int | None = Field(
        None, ge=1, le=MAX_DIMENSIONALITY,
        description="Length of each vector (truncated from the end); the model's full size when not set.")
    title: str | None = Field(
        None, min_length=1, max_length=1000,
        description="Title of the documents, embedded with each; only with task_type RETRIEVAL_DOCUMENT.")

    @model_validator(mode="after")
    def _title_only_for_documents(self) -> EmbedParams:
        if self.title is not None and self.task_type != "RETRIEVAL_DOCUMENT":
            raise ValueError(f"title is only used with task_type = \"RETRIEVAL_DOCUMENT\" "
                             f"(this manifest has task_type = {self.task_type!r})")
        return self


class Embed(TextTask):
    name = "embed"
    description = "Embed texts with a Gemini embedding model into embeddings.npy (float32 rows) with a row index."
    Params = EmbedParams
    Item = EmbedItem
    kind = "embed"
    default_model = "gemini-embedding-001"

    def requests(self, params: EmbedParams, items: Iterable[EmbedItem]) -> Iterator[TaskRequest]:
        # One dict for every request: an inline batch of embeddings has a single config.
        config = params.model_dump(include={"task_type", "output_dimensionality", "title"}, exclude_none=True)
        for item in items:
            yield TaskRequest(key=item.id, prompt=item.text, input={"id": item.id, "text": item.text}, config=config)

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            failure = result.failure()
            yield result.input["id"], error_entry(failure) if failure else {"row": result.embedding_row}


@hookimpl
def register_tasks(register):
    register(Embed())
