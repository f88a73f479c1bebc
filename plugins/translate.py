"""Translate texts into several languages: one request per distinct text and language.

organized.json: ``{original text: {language: translation}}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from batchd import hookimpl
from batchd.task import Task, TaskRequest, TaskResult, TextItem, error_entry, examples, warn

Language = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class TranslateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, min_length=1, description="Texts to translate (or use input).")
    languages: list[Language] = Field(
        min_length=1, description='Target languages, e.g. ["Spanish", "French", "German"].'
    )
    source_language: str | None = Field(None, description="Language of the texts; detected when unset.")


PROMPT = """\
Translate the text below {direction}.
Keep its meaning, tone and formatting. Leave names, URLs, code and placeholders such as {{name}} unchanged.
Reply with the translation only: no quotes, notes or explanations.

Text:
{text}"""


class Translate(Task):
    name = "translate"
    description = "Translate texts into one or more languages."
    Params = TranslateParams
    Item = TextItem
    default_config = {"temperature": 0.2}  # faithful rather than creative

    def inline_items(self, params: TranslateParams) -> tuple[str, list[str]] | None:
        return ("texts", params.texts) if params.texts is not None else None

    def requests(self, params: TranslateParams, items: Iterable[TextItem]) -> Iterator[TaskRequest]:
        source = f"from {params.source_language} " if params.source_language else ""
        languages = list(dict.fromkeys(params.languages))  # drop repeats, keep order
        if len(languages) < len(params.languages):
            repeated = [language for language, count in Counter(params.languages).items() if count > 1]
            warn(f"languages: {examples(repeated, len(repeated))} given more than once; each is translated into once")
        # organized.json is keyed by the original text, so a repeated text is translated once.
        translated: set[str] = set()
        dropped: list[str] = []  # ids of the repeats (the first few only are named)
        repeats = 0
        for item in items:
            if item.text in translated:
                repeats += 1
                if len(dropped) < 5:
                    dropped.append(f"{item.id} ({item.text})")
                continue
            translated.add(item.text)
            for language in languages:
                yield TaskRequest(
                    key=f"{item.id}:{language}",
                    prompt=PROMPT.format(direction=f"{source}into {language}", text=item.text),
                    input={"text": item.text, "language": language},
                )
        if repeats:
            warn(f"{repeats:,} repeated text(s) dropped: each text is translated once (organized.json is keyed by "
                 f"the text), so these items have no request of their own: {examples(dropped, repeats, chars=80)}")

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        # Results arrive in request order, so each text's languages are adjacent.
        for original, group in groupby(results, key=lambda result: result.input["text"]):
            yield original, {result.input["language"]: _translation(result) for result in group}


def _translation(result: TaskResult) -> str | dict[str, str]:
    failure = result.failure()
    return error_entry(failure) if failure else result.text.strip()


@hookimpl
def register_tasks(register):
    register(Translate())
