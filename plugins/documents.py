"""Run one prompt over many documents, e.g. "Summarize this document in 2 sentences: {document}".

organized.json: ``{document id: answer text}``, or ``{document id: data}`` with a ``response_schema``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchd import hookimpl
from batchd.task import Task, TaskRequest, TaskResult, TextItem
from batchd_plugins.template import (
    JSON_FORMAT,
    TEXT_FORMAT,
    JsonSchema,
    organized_value,
    structured_output,
    template_fields,
)

DOCUMENT_FIELD = "document"


class DocumentsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1,
        description='The prompt for each document, which goes where {document} is, e.g. "Summarize: {document}".',
    )
    documents: list[TextItem | str] | None = Field(
        None, min_length=1, description="Documents as texts or {id, text} tables (or use input)."
    )
    response_schema: JsonSchema | None = Field(
        None, description="JSON Schema of a structured answer; without it the answer is plain text."
    )

    @field_validator("prompt")
    @classmethod
    def _places_the_document(cls, prompt: str) -> str:
        fields = template_fields(prompt)
        if DOCUMENT_FIELD not in fields:
            raise ValueError("must contain {document}, where each document's text goes")
        others = [name for name in fields if name != DOCUMENT_FIELD]
        if others:
            raise ValueError(
                f"unknown field(s) {', '.join('{' + name + '}' for name in others)}: only {{document}} is "
                "filled in; write literal braces as {{ and }}"
            )
        return prompt


class Documents(Task):
    name = "documents"
    description = "Apply one prompt to each document (CSV/JSONL text column, .txt lines or inline)."
    Params = DocumentsParams
    Item = TextItem

    def inline_items(self, params: DocumentsParams) -> tuple[str, list[TextItem | str]] | None:
        return ("documents", params.documents) if params.documents is not None else None

    def requests(self, params: DocumentsParams, items: Iterable[TextItem]) -> Iterator[TaskRequest]:
        structured = params.response_schema is not None
        config = structured_output(params.response_schema) if structured else {}
        for document in items:
            yield TaskRequest(
                key=document.id,
                prompt=params.prompt.format_map({DOCUMENT_FIELD: document.text}),
                # The document itself too: a line of results.jsonl says what it answers.
                input={"id": document.id, "text": document.text, "format": JSON_FORMAT if structured else TEXT_FORMAT},
                config=config,
            )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            yield result.input["id"], organized_value(result)


@hookimpl
def register_tasks(register):
    register(Documents())
