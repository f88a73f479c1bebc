"""Analyze each text in several ways: sentiment, themes, entities, summary, and custom analyses.

One request per text and analysis, each with structured output where the answer is data.

organized.json: ``{item id: {analysis: result}}``, where result is

- ``sentiment``: ``{"label", "score", "rationale"}`` (as the ``sentiment`` task),
- ``themes``: ``[{"theme", "evidence"}, ...]``,
- ``entities``: ``[{"name", "type"}, ...]`` with type person, organization, location, product or other,
- ``summary``: ``{"summary": "..."}``,
- a custom analysis: its data when it has a ``response_schema``, else its answer text,

or an error entry (``{"error": ...}``) when that request failed or its answer is not the data asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, TypeAdapter, field_validator,
                      model_validator)

from batchd import hookimpl
from batchd.task import TaskRequest, TaskResult, TextItem, TextsParams, TextTask, examples, warn
from batchd_plugins.sentiment import PROMPT as SENTIMENT_PROMPT
from batchd_plugins.sentiment import Verdict
from batchd_plugins.template import (
    JSON_FORMAT,
    TEXT_FORMAT,
    JsonSchema,
    organized_value,
    structured_output,
    template_fields,
)

TEXT_FIELD = "text"

# Analysis names never contain ":", so request keys "{item id}:{analysis}" stay unique even for
# ids that do (the analysis is whatever follows the last ":").
AnalysisName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=64)]


# --- Built-in analyses ---------------------------------------------------------------------------


class Theme(BaseModel):
    theme: str = Field(description="The theme, as a short noun phrase.")
    evidence: str = Field(description="A brief quote or paraphrase from the text that shows it.")


class Entity(BaseModel):
    name: str = Field(description="The entity as written in the text.")
    type: Literal["person", "organization", "location", "product", "other"]


class Summary(BaseModel):
    summary: str = Field(description="One or two sentences.")


@dataclass(frozen=True, slots=True)
class BuiltinAnalysis:
    #: A str.format template with {text} and {context} (" (what the texts are)" or "").
    prompt: str
    #: Validates answers; its JSON Schema is the requested response schema.
    answer: TypeAdapter

    @property
    def response_schema(self) -> JsonSchema:
        return self.answer.json_schema()


def _text_prompt(instructions: str) -> str:
    return f'{instructions}\n\nText:\n"""\n{{text}}\n"""'


BUILTIN_ANALYSES: dict[str, BuiltinAnalysis] = {
    # The sentiment task's prompt and answer, so both tasks judge sentiment alike.
    "sentiment": BuiltinAnalysis(SENTIMENT_PROMPT, TypeAdapter(Verdict)),
    "themes": BuiltinAnalysis(
        _text_prompt(
            "Identify the main themes of the text below{context}, most prominent first (at most 5).\n"
            "- theme: a short noun phrase naming the theme.\n"
            "- evidence: a brief quote or close paraphrase from the text that shows it."
        ),
        TypeAdapter(list[Theme]),
    ),
    "entities": BuiltinAnalysis(
        _text_prompt(
            "Extract the named entities mentioned in the text below{context}.\n"
            "- name: the entity as written in the text; list each entity once.\n"
            '- type: "person", "organization", "location", "product" or "other".\n'
            "Return an empty list when there are none."
        ),
        TypeAdapter(list[Entity]),
    ),
    "summary": BuiltinAnalysis(
        _text_prompt(
            "Summarize the text below{context} in one or two sentences.\n"
            "Keep its key facts and conclusions; add nothing that is not in the text."
        ),
        TypeAdapter(Summary),
    ),
}


# --- Manifest fields -------------------------------------------------------------------------------


class CustomAnalysis(BaseModel):
    """An analysis defined in the manifest, e.g. ``[analysis_types.risk]``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The prompt; {text} is replaced by the text analyzed.")
    response_schema: JsonSchema | None = Field(
        None, description="JSON Schema of a structured answer; without it the answer is plain text."
    )

    @field_validator("prompt")
    @classmethod
    def _places_the_text(cls, prompt: str) -> str:
        fields = template_fields(prompt)
        if fields != [TEXT_FIELD]:
            raise ValueError("must contain {text} and no other {field}; write literal braces as {{ and }}")
        return prompt


class AnalysisParams(TextsParams):
    _repeated: list[str] = PrivateAttr(default_factory=list)  # analyses named more than once
    context: str | None = Field(
        None, description='What the texts are, to guide the analyses, e.g. "customer feedback".'
    )
    analyses: list[AnalysisName] | None = Field(
        None,
        min_length=1,
        description=(
            f"Analyses to run on each text, in order: {', '.join(BUILTIN_ANALYSES)} or names defined in "
            "analysis_types. Default: all built-in ones, then all defined ones."
        ),
    )
    analysis_types: dict[AnalysisName, CustomAnalysis] = Field(
        default_factory=dict, description="Custom analyses by name, each with a prompt and an optional schema."
    )

    @model_validator(mode="after")
    def _check_analyses(self) -> AnalysisParams:
        redefined = sorted(self.analysis_types.keys() & BUILTIN_ANALYSES.keys())
        if redefined:
            raise ValueError(f"analysis_types: {', '.join(redefined)} is built in; give your analysis another name")
        known = [*BUILTIN_ANALYSES, *self.analysis_types]
        if self.analyses is None:
            self.analyses = known
        unknown = [name for name in self.analyses if name not in known]
        if unknown:
            raise ValueError(f"analyses: unknown {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        self._repeated = [name for name in dict.fromkeys(self.analyses) if self.analyses.count(name) > 1]
        self.analyses = list(dict.fromkeys(self.analyses))  # drop repeats: keys must be unique
        return self


# --- The task ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PlannedAnalysis:
    """One analysis as every text's request for it is built."""

    name: str
    prompt: str  # a template with {text} only left to fill
    config: dict[str, Any]
    format: str


class Analysis(TextTask):
    name = "analysis"
    description = "Analyze each text for sentiment, themes, entities, a summary and custom analyses (JSON results)."
    Params = AnalysisParams
    default_config = {"temperature": 0.0}  # analyses should be repeatable

    def requests(self, params: AnalysisParams, items: Iterable[TextItem]) -> Iterator[TaskRequest]:
        if params._repeated:
            warn(f"analyses: {examples(params._repeated, len(params._repeated))} given more than once; each is run "
                 f"once per text")
        plan = [_plan(name, params) for name in params.analyses]
        for item in items:
            for analysis in plan:
                yield TaskRequest(
                    key=f"{item.id}:{analysis.name}",
                    prompt=analysis.prompt.format_map({TEXT_FIELD: item.text}),
                    input={"id": item.id, "text": item.text, "analysis": analysis.name, "format": analysis.format},
                    config=analysis.config,
                )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        # Results arrive in request order, so each item's analyses are adjacent.
        for item_id, group in groupby(results, key=lambda result: result.input["id"]):
            yield item_id, {result.input["analysis"]: _analysis_result(result) for result in group}


def _plan(name: str, params: AnalysisParams) -> _PlannedAnalysis:
    builtin = BUILTIN_ANALYSES.get(name)
    if builtin is not None:
        context = f" ({params.context})" if params.context else ""
        # Fill {context} now and leave {text} for each item; braces in the context stay literal.
        prompt = builtin.prompt.format(context=context.replace("{", "{{").replace("}", "}}"), text="{text}")
        return _PlannedAnalysis(name, prompt, structured_output(builtin.response_schema), JSON_FORMAT)
    custom = params.analysis_types[name]
    if custom.response_schema is None:
        return _PlannedAnalysis(name, custom.prompt, {}, TEXT_FORMAT)
    return _PlannedAnalysis(name, custom.prompt, structured_output(custom.response_schema), JSON_FORMAT)


def _analysis_result(result: TaskResult) -> Any:
    builtin = BUILTIN_ANALYSES.get(result.input["analysis"])
    return organized_value(result, builtin.answer if builtin else None)


@hookimpl
def register_tasks(register):
    register(Analysis())
