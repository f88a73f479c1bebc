"""Classify the sentiment of texts with structured output (label, score, rationale).

organized.json: ``{item id: {"label": ..., "score": ..., "rationale": ...}}``. ``score`` is the
polarity from -1 (very negative) through 0 (neutral or balanced) to 1 (very positive).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from batchd import hookimpl
from batchd.task import TaskRequest, TaskResult, TextItem, TextsParams, TextTask, error_entry


class SentimentParams(TextsParams):
    context: str | None = Field(
        None, description='What the texts are, to guide the reading, e.g. "reviews of a coffee shop".'
    )


class Verdict(BaseModel):
    """The structured answer requested for each text."""

    label: Literal["positive", "negative", "neutral", "mixed"] = Field(
        description="neutral: no clear sentiment; mixed: clear positive and negative parts."
    )
    score: float = Field(ge=-1, le=1, description="Polarity: -1 very negative, 0 neutral or balanced, 1 very positive.")
    rationale: str = Field(description="One short sentence on what in the text drives the label.")


RESPONSE_SCHEMA = Verdict.model_json_schema()
_LABELS = frozenset(Verdict.model_fields["label"].annotation.__args__)

PROMPT = """\
Classify the sentiment of the text below{context}.
- label: "positive", "negative", "neutral" (no clear sentiment) or "mixed" (clearly positive and negative parts).
- score: overall polarity from -1 (very negative) through 0 (neutral or balanced) to 1 (very positive).
- rationale: one short sentence naming what in the text drives the label.

Text:
\"\"\"
{text}
\"\"\""""


class Sentiment(TextTask):
    name = "sentiment"
    description = "Label the sentiment of texts as positive, negative, neutral or mixed, with a score."
    Params = SentimentParams
    default_config = {"temperature": 0.0}  # the same text should get the same label

    def requests(self, params: SentimentParams, items: Iterable[TextItem]) -> Iterator[TaskRequest]:
        context = f" ({params.context})" if params.context else ""
        structured_output = {"response_mime_type": "application/json", "response_json_schema": RESPONSE_SCHEMA}
        for item in items:
            yield TaskRequest(
                key=item.id,
                prompt=PROMPT.format(context=context, text=item.text),
                input={"id": item.id, "text": item.text},
                config=structured_output,
            )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            yield result.input["id"], _verdict(result)


def _verdict(result: TaskResult) -> dict[str, Any]:
    failure = result.failure()
    if failure:
        return error_entry(failure)
    data = result.data
    # The shape a well-behaved model returns is checked here directly (it is every answer of a
    # big job); anything else goes through the model, which also explains what is wrong.
    if (type(data) is dict and type(label := data.get("label")) is str and label in _LABELS
            and type(score := data.get("score")) in (float, int) and -1 <= score <= 1
            and type(rationale := data.get("rationale")) is str):
        return {"label": label, "score": float(score), "rationale": rationale}
    try:
        return Verdict.model_validate(data).model_dump()
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors())
        return {**error_entry(f"unexpected answer ({problem})"), "text": result.text}


@hookimpl
def register_tasks(register):
    register(Sentiment())
