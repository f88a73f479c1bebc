"""No-code custom tasks: a prompt template whose ``{column}`` fields are filled from each input row.

organized.json: ``{row id: answer text}``, or ``{row id: data}`` with a ``response_schema``.

Also home of the helpers the other template-driven tasks (``documents``, ``analysis``) share:
checking a template's fields, asking for structured output, and turning a result into its
organized value.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from batchd import hookimpl
from batchd.task import ItemConfig, ItemId, Task, TaskRequest, TaskResult, error_entry

#: A JSON Schema the answers must follow (Gemini's ``response_json_schema``).
JsonSchema = dict[str, Any]

#: ``TaskRequest.input["format"]`` of requests that ask for JSON, so organize() knows to expect data.
JSON_FORMAT = "json"
TEXT_FORMAT = "text"
Format = Literal["json", "text"]


# --- Helpers shared by the template-driven tasks -------------------------------------------------


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a ``str.format`` template uses, each once, in order of first use.

    :raises ValueError: for a malformed template (an unmatched brace), a positional field
        (``{}``, ``{0}``) or a field with attribute or index access (``{a.b}``, ``{a[0]}``):
        templates are filled from named values only. Literal braces are written ``{{`` and ``}}``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"malformed template ({exc}); write literal braces as {{{{ and }}}}") from None
    fields: dict[str, None] = {}
    for _, name, _, _ in parsed:
        if name is None:  # literal text only
            continue
        if not name or name.isdigit():
            raise ValueError("use named fields such as {name}, not {} or {0}")
        if "." in name or "[" in name:
            raise ValueError(f"field {{{name}}}: use a plain name, without attribute or index access")
        fields[name] = None
    return list(fields)


def structured_output(schema: JsonSchema) -> dict[str, Any]:
    """The request config asking for JSON that follows ``schema``."""
    return {"response_mime_type": "application/json", "response_json_schema": schema}


def organized_value(result: TaskResult, validator: TypeAdapter | None = None) -> Any:
    """What organize() shows for one result: its text, its JSON data, or an error entry.

    Requests tagged ``input["format"] == "json"`` asked for structured output: their value is the
    parsed data, checked against ``validator`` when given (a schema the task knows as a model).
    An answer that is not the expected data becomes an error entry keeping the raw text.
    """
    failure = result.failure()
    if failure:
        return error_entry(failure)
    if result.input.get("format") != JSON_FORMAT:
        return result.text.strip()
    if result.data is None:
        return {**error_entry("unexpected answer (not valid JSON)"), "text": result.text}
    if validator is None:  # a user's schema: the service enforced it, batchd has no model of it
        return result.data
    try:
        return validator.dump_python(validator.validate_python(result.data), mode="json")
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors())
        return {**error_entry(f"unexpected answer ({problem})"), "text": result.text}


# --- The template task -----------------------------------------------------------------------------


def _number_to_str(value: Any) -> Any:
    # JSONL and TOML rows may hold numbers (price = 9.5); the template shows them as written.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


#: A row's column value, as the template shows it.
CellValue = Annotated[str, BeforeValidator(_number_to_str)]

#: Every row has an id (its 1-based position unless given), so a template may always use {id}.
ROW_ID = "id"


class TemplateRow(BaseModel):
    """One input row: an id plus any columns, each available to the template as ``{column}``."""

    # Any column is welcome: which ones the template needs is only known from the manifest.
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, CellValue]

    id: ItemId | None = Field(None, description="Stable id; defaults to the row's 1-based position.")
    config: ItemConfig = None

    def values(self) -> dict[str, Any]:
        """The values the template may use: every column, ``id`` included."""
        return self.model_dump(exclude={"config"})


class TemplateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(
        min_length=1,
        description='The prompt, with {column} fields filled from each row, e.g. "Write a blurb for {name}".',
    )
    rows: list[TemplateRow] | None = Field(None, min_length=1, description="Inline rows (or use input).")
    response_schema: JsonSchema | None = Field(
        None, description="JSON Schema of a structured answer; without it the answer is plain text."
    )

    @field_validator("template")
    @classmethod
    def _has_fields(cls, template: str) -> str:
        if not template_fields(template):
            raise ValueError("has no {column} fields, so every row would get the same prompt")
        return template

    @model_validator(mode="after")
    def _inline_rows_fill_the_template(self) -> TemplateParams:
        # Inline rows are checked here so the manifest is rejected on load; rows read from an
        # input file are checked as their requests are built (see Template.requests).
        fields = template_fields(self.template)
        for index, row in enumerate(self.rows or ()):
            missing = _missing_fields(fields, row)
            if missing:
                raise ValueError(f"rows[{index}] has no value for template field(s) {_quoted(missing)}")
        return self


class Template(Task):
    name = "template"
    description = "Fill a prompt template's {column} fields from each input row (CSV/JSONL); optional JSON schema."
    Params = TemplateParams
    Item = TemplateRow

    def inline_items(self, params: TemplateParams) -> tuple[str, list[TemplateRow]] | None:
        return ("rows", params.rows) if params.rows is not None else None

    def requests(self, params: TemplateParams, items: Iterable[TemplateRow]) -> Iterator[TaskRequest]:
        output_format: Format = JSON_FORMAT if params.response_schema is not None else TEXT_FORMAT
        config = structured_output(params.response_schema) if params.response_schema is not None else {}
        fields = template_fields(params.template)  # parsed once, not per row
        for row in items:
            missing = _missing_fields(fields, row)
            if missing:
                raise ValueError(
                    f"row {row.id!r} has no value for template field(s) {_quoted(missing)} "
                    "(empty cells count as missing)"
                )
            values = row.values()
            yield TaskRequest(
                key=row.id,
                prompt=params.template.format_map(values),
                # The row's columns too: a line of results.jsonl says what it answers.
                input={"id": row.id, "row": {name: value for name, value in values.items() if name != ROW_ID},
                       "format": output_format},
                config=config,
            )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            yield result.input["id"], organized_value(result)


def _missing_fields(fields: Iterable[str], row: TemplateRow) -> list[str]:
    values: Mapping[str, Any] = row.values()
    return [name for name in fields if name != ROW_ID and values.get(name) is None]


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


@hookimpl
def register_tasks(register):
    register(Template())
