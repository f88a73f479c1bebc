"""A batchd task plugin: extract keywords from texts with structured output.

organized.json: ``{item id: [keyword, ...]}``, or ``{item id: {"error": ...}}`` where a text got
no usable answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import Field

from batchd import hookimpl
from batchd.task import TaskRequest, TaskResult, TextItem, TextsParams, TextTask, error_entry


class KeywordsParams(TextsParams):
    # TextsParams brings `items` (texts with ids) or `texts`, and extra="forbid":
    # a misspelt manifest field is an error naming it, not silently ignored.
    max_keywords: int = Field(5, ge=1, le=20, description="At most this many keywords per text.")


def keywords_schema(max_keywords: int) -> dict[str, Any]:
    """The JSON Schema every answer must follow: an object with a list of keywords."""
    return {
        "type": "object",
        "properties": {
            "keywords": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": max_keywords,
                "description": "The most important keywords or key phrases, most important first.",
            }
        },
        "required": ["keywords"],
    }


PROMPT = """\
List at most {max_keywords} keywords or short key phrases that best describe the text below,
most important first, in the text's own language.

Text:
\"\"\"
{text}
\"\"\""""


class Keywords(TextTask):
    name = "keywords"
    description = "Extract up to max_keywords keywords from each text (structured output)."
    Params = KeywordsParams
    default_config = {"temperature": 0.0}  # the same text should get the same keywords

    def requests(self, params: KeywordsParams, items: Iterable[TextItem]) -> Iterator[TaskRequest]:
        # One schema object for the whole job: batchd encodes a shared schema once, not per request.
        structured_output = {
            "response_mime_type": "application/json",
            "response_json_schema": keywords_schema(params.max_keywords),
        }
        for item in items:
            yield TaskRequest(
                key=item.id,
                prompt=PROMPT.format(max_keywords=params.max_keywords, text=item.text),
                input={"id": item.id, "text": item.text},
                config=structured_output,
            )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            yield result.input["id"], keywords_of(result)


def keywords_of(result: TaskResult) -> list[str] | dict[str, str]:
    """The cleaned keyword list of one answer, or an error entry saying why there is none."""
    failure = result.failure()
    if failure:
        return error_entry(failure)
    keywords = result.data.get("keywords") if isinstance(result.data, dict) else None
    if not isinstance(keywords, list):
        return error_entry(f"unexpected answer: {result.text[:200]!r}")
    cleaned: list[str] = []
    seen: set[str] = set()
    for keyword in keywords:
        if isinstance(keyword, str) and keyword.strip() and keyword.strip().casefold() not in seen:
            seen.add(keyword.strip().casefold())
            cleaned.append(keyword.strip())
    return cleaned or error_entry("the answer has no keywords")


@hookimpl
def register_tasks(register):
    register(Keywords())
