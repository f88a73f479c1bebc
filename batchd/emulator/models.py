"""The models the emulator knows, the check every model-bound route makes, and the Model resources
``models.get`` and ``models.list`` answer with.

Google adds models every few weeks. So that a program naming a new one is not refused here while
Google takes it, the emulator accepts, besides its list, any id of Google's current families by
pattern (``gemini-<version>-<flash|pro|…>[-suffix]``, ``gemini-<family>-latest``,
``gemini-embedding-…``). ``--strict-models`` (or a list of one's own, ``--model``) accepts exactly
the list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from batchd.emulator.errors import not_found

#: Current Gemini model ids (``--model`` replaces the list). Embedding models are the ones whose id
#: contains "embedding": they serve embeddings only, every other model serves generation only.
DEFAULT_MODELS: tuple[str, ...] = (
    "gemini-3.5-flash",
    "gemini-3.1-pro-preview",
    "gemini-3-pro-image-preview",
    "gemini-3-pro-preview",
    "gemini-3-flash-preview",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-flash-preview-09-2025",
    "gemini-2.5-flash-lite-preview-09-2025",
    "gemini-2.5-flash-image",
    "gemini-2.0-flash",
    "gemini-2.0-flash-001",
    "gemini-2.0-flash-lite",
    "gemini-2.0-flash-lite-001",
    "gemini-flash-latest",
    "gemini-flash-lite-latest",
    "gemini-pro-latest",
    "gemini-embedding-001",
    "text-embedding-004",
)


#: Ids of Google's current model families, accepted besides the list unless models are strict.
FAMILY_PATTERN = re.compile(
    r"gemini-\d+(?:\.\d+)?-(?:pro|flash|flash-lite|flash-image|pro-image|flash-live|pro-tts|flash-tts)"
    r"(?:-[a-z0-9][a-z0-9.-]*)?"
    r"|gemini-(?:pro|flash|flash-lite)-latest"
    r"|gemini-embedding-[a-z0-9][a-z0-9.-]*"
    r"|text-embedding-\d+")

GENERATION_METHODS = ("generateContent", "countTokens", "createCachedContent", "batchGenerateContent")
EMBEDDING_METHODS = ("embedContent", "countTextTokens", "countTokens", "asyncBatchEmbedContent")


def is_embedding_model(model_id: str) -> bool:
    return "embedding" in model_id


def model_resource(model_id: str) -> dict:
    """A Model resource as ``models.get`` answers it; limits are those of the family (Gemini's 1M-token
    context and 64K output, 2,048 tokens for embedding models)."""
    if is_embedding_model(model_id):
        return {"name": f"models/{model_id}", "version": "001", "displayName": _display_name(model_id),
                "description": "Emulated embedding model.", "inputTokenLimit": 2048, "outputTokenLimit": 1,
                "supportedGenerationMethods": list(EMBEDDING_METHODS)}
    return {"name": f"models/{model_id}", "version": "001", "displayName": _display_name(model_id),
            "description": "Emulated Gemini model.", "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": list(GENERATION_METHODS), "temperature": 1.0, "maxTemperature": 2.0,
            "topP": 0.95, "topK": 64, "thinking": thinks(model_id)}


@lru_cache(maxsize=256)
def thinks(model_id: str) -> bool:
    """Whether the model thinks by default (Gemini 2.5 and later, not their image or lite variants)."""
    match = re.match(r"gemini-(\d+)(?:\.(\d+))?-", model_id)
    if match is None:
        return model_id in ("gemini-pro-latest", "gemini-flash-latest")
    version = (int(match[1]), int(match[2] or 0))
    return version >= (2, 5) and "image" not in model_id and "lite" not in model_id


def _display_name(model_id: str) -> str:
    return " ".join(word.capitalize() if not word[:1].isdigit() else word for word in model_id.split("-"))


class ModelCatalog:
    def __init__(self, models: Iterable[str] | None = None, *, strict: bool = False) -> None:
        self.ids = frozenset(m.removeprefix("models/") for m in (models or DEFAULT_MODELS))
        #: A list of one's own is exact too: whoever names their models wants only those.
        self.strict = strict or models is not None

    def knows(self, model_id: str) -> bool:
        return model_id in self.ids or not self.strict and FAMILY_PATTERN.fullmatch(model_id) is not None

    def listed(self) -> list[dict]:
        return [model_resource(model_id) for model_id in sorted(self.ids)]

    def get(self, model: str, api_version: str) -> dict:
        model_id = model.removeprefix("models/")
        if not self.knows(model_id):
            raise not_found(f"models/{model_id} is not found for API version {api_version}.")
        return model_resource(model_id)

    def resolve(self, model: str, method: str, api_version: str = "v1beta") -> str:
        """The resource name ``models/<id>`` for a model a route was called with, or 404 NOT_FOUND.

        Tuned models (``tunedModels/...``) are accepted as they are: the emulator cannot know them.
        """
        if model.startswith("tunedModels/"):
            return model
        model_id = model.removeprefix("models/")
        embedding_method = method in ("asyncBatchEmbedContent", "embedContent", "batchEmbedContents")
        # countTokens serves both kinds of model (each lists it among its supportedGenerationMethods).
        serves = method == "countTokens" or is_embedding_model(model_id) == embedding_method
        if not self.knows(model_id) or not serves:
            raise not_found(
                f"models/{model_id} is not found for API version {api_version}, or is not supported for "
                f"{method}. Call ListModels to see the list of available models and their supported methods."
            )
        return f"models/{model_id}"
