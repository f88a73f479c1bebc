"""Write variations of one piece of content for different tones, lengths and audiences.

organized.json: ``{variation id: text}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from batchd import hookimpl
from batchd.task import ItemConfig, ItemId, Task, TaskRequest, TaskResult, error_entry


class Variation(BaseModel):
    """One variation to write; blank settings fall back to the defaults."""

    model_config = ConfigDict(extra="forbid")

    id: ItemId | None = Field(None, description="Name of the variation; defaults to its 1-based position.")
    tone: str = Field("neutral", min_length=1, description='e.g. "formal", "casual", "enthusiastic".')
    length: str = Field("medium", min_length=1, description='e.g. "short", "about 50 words", "long".')
    audience: str = Field("general", min_length=1, description='e.g. "executives", "developers".')
    style: str = Field("standard", min_length=1, description='e.g. "tweet", "press release", "bullet list".')
    temperature: float | None = Field(None, ge=0, le=2, description="Overrides the manifest's temperature.")
    max_output_tokens: int | None = Field(None, ge=1, description="Overrides the manifest's max_output_tokens.")
    config: ItemConfig = None


class VariationsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_content: str = Field(min_length=1, description="The content every variation rewrites.")
    variations: list[Variation] | None = Field(None, min_length=1, description="The variations (or use input).")


PROMPT = """\
Rewrite the content below as a new variation with these requirements:
- Tone: {tone}
- Length: {length}
- Target audience: {audience}
- Style: {style}

Keep the facts and the core message; do not invent claims, numbers or quotes.
Reply with the new version only, without a title or any commentary.

Content:
{content}"""

# Per-variation settings that become the request's generation config.
_GENERATION_FIELDS = ("temperature", "max_output_tokens")


class Variations(Task):
    name = "variations"
    description = "Rewrite one piece of content in several tones, lengths, audiences and styles."
    Params = VariationsParams
    Item = Variation
    default_config = {"temperature": 0.7}  # some creativity, still on message

    def inline_items(self, params: VariationsParams) -> tuple[str, list[Variation]] | None:
        return ("variations", params.variations) if params.variations is not None else None

    def requests(self, params: VariationsParams, items: Iterable[Variation]) -> Iterator[TaskRequest]:
        for variation in items:
            yield TaskRequest(
                key=variation.id,
                prompt=PROMPT.format(
                    tone=variation.tone,
                    length=variation.length,
                    audience=variation.audience,
                    style=variation.style,
                    content=params.base_content,
                ),
                input=variation.model_dump(include={"id", "tone", "length", "audience", "style"}),
                config=variation.model_dump(include=set(_GENERATION_FIELDS), exclude_none=True),
            )

    def organize(self, results: Iterable[TaskResult]) -> Iterator[tuple[str, Any]]:
        for result in results:
            failure = result.failure()
            yield result.input["id"], error_entry(failure) if failure else result.text.strip()


@hookimpl
def register_tasks(register):
    register(Variations())
