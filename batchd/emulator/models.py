"""The models the emulator knows, and the check every model-bound route makes."""

from __future__ import annotations

from collections.abc import Iterable

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


def is_embedding_model(model_id: str) -> bool:
    return "embedding" in model_id


class ModelCatalog:
    def __init__(self, models: Iterable[str] | None = None) -> None:
        self.ids = frozenset(m.removeprefix("models/") for m in (models or DEFAULT_MODELS))

    def resolve(self, model: str, method: str, api_version: str = "v1beta") -> str:
        """The resource name ``models/<id>`` for a model a route was called with, or 404 NOT_FOUND.

        Tuned models (``tunedModels/...``) are accepted as they are: the emulator cannot know them.
        """
        if model.startswith("tunedModels/"):
            return model
        model_id = model.removeprefix("models/")
        embedding_method = method in ("asyncBatchEmbedContent", "embedContent", "batchEmbedContents")
        if model_id not in self.ids or is_embedding_model(model_id) != embedding_method:
            raise not_found(
                f"models/{model_id} is not found for API version {api_version}, or is not supported for "
                f"{method}. Call ListModels to see the list of available models and their supported methods."
            )
        return f"models/{model_id}"
