"""Answers for the local Gemini Batch API emulator.

The emulator's HTTP layer hands every request of a batch to a :class:`Responder`. The default,
:class:`EmulatedResponder`, answers instantly and deterministically, so that batchd (and anything
else that speaks the Gemini Batch API) can be exercised end to end without a network or a key.
Another responder, e.g. one backed by a local model, can be plugged in instead; it only has to
implement the three methods of :class:`Responder`.

Rules of the emulated answers (documented in docs/emulator.md):

* **Deterministic.** The answer is a pure function of the model name and the request: a
  BLAKE2b digest of the model name, the system instruction, every part of ``contents`` and the
  sampling settings (``temperature``, ``topP``, ``topK``, ``seed``, penalties) seeds all choices
  (never Python's randomized ``hash()``). The same request gives byte-identical output in every
  process and on every run; another ``seed`` or temperature gives another answer.
  ``maxOutputTokens`` and ``stopSequences`` only cut that same answer.
* **Marked.** Plain-text answers start with ``[emulated <model>] `` (see :data:`MARKER_TEMPLATE`),
  then echo the prompt (its first and last words) and add a few filler words picked from the
  digest. In JSON mode every free string starts with ``emulated``. Every ``responseId`` starts with
  ``emu-``.
* **Token estimate.** ``ceil(characters / 4)`` per text part (characters = Unicode code points; an
  empty part counts 0), plus :data:`NON_TEXT_PART_TOKENS` (258, what Gemini charges for an image)
  per non-text part (``inlineData``, ``fileData``, ``functionCall``, ...). ``promptTokenCount``
  covers ``contents`` and ``systemInstruction``; ``candidatesTokenCount`` applies the same rule
  to the answer text(s); ``totalTokenCount`` is their sum. ``count_tokens`` uses the same rule.
* **maxOutputTokens.** An answer longer than ``maxOutputTokens * 4`` characters is cut to that
  length and gets ``finishReason: MAX_TOKENS`` (so ``candidatesTokenCount <= maxOutputTokens``);
  otherwise ``finishReason`` is ``STOP``. In JSON mode a smaller instance (only required
  properties, minimal arrays, short strings) is tried first; only if that does not fit either is
  the JSON text cut, which leaves invalid JSON, as the real service does.
* **stopSequences.** The text is cut before the first occurrence of any stop sequence
  (``finishReason: STOP``).
* **candidateCount** (1..8) gives that many different candidates, ``index`` 0..n-1;
  ``candidatesTokenCount`` is their sum. ``promptTokensDetails`` splits ``promptTokenCount`` by
  modality (TEXT; IMAGE, AUDIO, VIDEO, DOCUMENT by a part's MIME type).
* **Thinking.** A model that thinks (``models.thinks``, or any model given a ``thinkingConfig``)
  reports ``thoughtsTokenCount``, counted in ``totalTokenCount``: 32 plus half the prompt's tokens,
  scaled by ``thinkingLevel``, never more than a positive ``thinkingBudget``, none with a budget of 0.
  With ``includeThoughts`` the answer's first part is a thought summary (``"thought": true``).
* **JSON mode** (``responseMimeType: application/json``): with ``responseSchema`` (OpenAPI subset,
  upper- or lower-case types, ``nullable``, ``propertyOrdering``) or ``responseJsonSchema`` (JSON
  Schema) the text is compact JSON valid against the schema (made by
  :mod:`batchd.emulator.structured`); without a schema it is
  ``{"emulated":true,"text":"<plain-text answer>"}``. ``text/x.enum`` returns one enum value.
* **Embeddings.** A unit-norm vector (L2 norm 1) of ``outputDimensionality`` floats derived from
  a SHAKE-256 stream of the text's digest. Default dimension: 3072 for ``gemini-embedding-*``
  models (as the real service), 768 for any other model; requested sizes are clamped to 1..3072.

The responder never raises on odd input: unknown parts, unknown schema keywords and unresolvable
``$ref``s degrade to something reasonable.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import marshal
import math
import struct
from typing import Any, Protocol, runtime_checkable

from batchd.emulator.models import thinks
from batchd.emulator.structured import FILLER_WORDS, Plan, Rng, compile_schema
from batchd.emulator.wire import as_int, compact_json_encoder, get_field

__all__ = [
    "Responder",
    "EmulatedResponder",
    "MARKER_TEMPLATE",
    "NON_TEXT_PART_TOKENS",
    "estimate_tokens",
    "load_responder",
]

#: Prefix of every plain-text answer; ``{model}`` is the model name without ``models/``.
MARKER_TEMPLATE = "[emulated {model}] "
#: Tokens counted for each part that is not text (inline data, file data, function calls...).
NON_TEXT_PART_TOKENS = 258
#: Largest embedding size the real API offers; larger requests are clamped to it.
MAX_EMBEDDING_DIMENSION = 3072

# Prebuilt encoders: json.dumps with non-default arguments builds a new encoder per call.
_compact_json = compact_json_encoder()
_sorted_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
_SEP = b"\x1f"
# generationConfig fields that change *which* answer is sampled; other fields (maxOutputTokens,
# stopSequences, schemas...) only shape or cut the same answer.
_SAMPLING_KEYS = {
    "temperature": "temperature", "topP": "topP", "top_p": "topP", "topK": "topK",
    "top_k": "topK", "seed": "seed", "presencePenalty": "presencePenalty",
    "presence_penalty": "presencePenalty", "frequencyPenalty": "frequencyPenalty",
    "frequency_penalty": "frequencyPenalty",
}


def estimate_tokens(text: str) -> int:
    """Token estimate of one text: ceil(characters / 4); 0 for an empty string."""
    return (len(text) + 3) // 4


@runtime_checkable
class Responder(Protocol):
    """What the emulator asks for each request of a batch (REST camelCase JSON dicts)."""

    def generate(self, request: dict, model: str) -> dict:
        """Answer one GenerateContentRequest with a GenerateContentResponse dict."""
        ...

    def embed(self, request: dict, model: str) -> dict:
        """Answer one EmbedContentRequest: ``{"embedding": {"values": [...]}, "tokenCount": "N"}``."""
        ...

    def count_tokens(self, contents: list) -> int:
        """Token count of ``contents`` (a list of Content dicts; strings are accepted too)."""
        ...


def load_responder(spec: str) -> Responder:
    """Load a responder from ``"package.module:attribute"``; a class or factory is called."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"responder spec must look like 'package.module:attribute', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    # A class (which itself looks like a Responder) or a factory is called to get the instance.
    if isinstance(target, type) or (callable(target) and not isinstance(target, Responder)):
        target = target()
    responder = target
    if not isinstance(responder, Responder):
        raise TypeError(f"{spec} is not a Responder (needs generate, embed and count_tokens)")
    return responder


# --------------------------------------------------------------------------------------------
# small helpers


def _model_name(model: str) -> str:
    return model.rpartition("/")[2] if model else "model"


def _as_contents(contents: Any) -> list:
    """Normalize contents: a string, one Content dict or a list of Contents/strings/parts."""
    if contents is None:
        return []
    if isinstance(contents, str):
        return [{"parts": [{"text": contents}]}]
    if isinstance(contents, dict):
        return [contents] if "parts" in contents else [{"parts": [contents]}]
    return contents


def _iter_parts(content: Any) -> list:
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, dict):
        parts = content.get("parts")
        if parts is None:
            return [content] if content else []
        if isinstance(parts, (str, dict)):
            return [parts]
        return parts
    return []


def _modality(part: object) -> str:
    """The ``promptTokensDetails`` modality a non-text part counts under: by its MIME type (inline or file
    data), else TEXT (a function call or response is text to the model)."""
    if isinstance(part, dict):
        data = part.get("inlineData") or part.get("inline_data") or part.get("fileData") or part.get("file_data")
        mime = str(get_field(data, "mimeType", "mime_type") or "") if isinstance(data, dict) else ""
        for prefix, modality in (("image/", "IMAGE"), ("audio/", "AUDIO"), ("video/", "VIDEO"),
                                 ("application/pdf", "DOCUMENT")):
            if mime.startswith(prefix):
                return modality
    return "TEXT"


def _part_hash_bytes(part: Any) -> bytes:
    """Stable bytes for a non-text part (only these, rare, pay for sorted JSON)."""
    try:
        return _sorted_json(part).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return repr(part).encode("utf-8", "surrogatepass")


def _echo(text: str) -> str:
    """First and last words of the prompt, so a reader can tell what the answer was for."""
    words = text.split(None, 12)
    if len(words) <= 12:
        echo = " ".join(words)
    else:
        tail = text.rsplit(None, 6)[-6:]
        echo = " ".join(words[:6]) + " ... " + " ".join(tail)
    if len(echo) > 96:
        echo = echo[:93] + "..."
    return echo or "(no text)"


# --------------------------------------------------------------------------------------------
# the default responder


class EmulatedResponder:
    """Deterministic, instant answers; see the module docstring for the exact rules."""

    #: How many compiled schemas are kept (a batch usually repeats one schema).
    schema_cache_size = 256
    #: How many generationConfigs' settings are kept (a batch usually repeats one or a few configs).
    config_cache_size = 64

    def __init__(self, *, default_embedding_dimension: int | None = None) -> None:
        """``default_embedding_dimension`` overrides the per-model default (3072 / 768)."""
        self.default_embedding_dimension = default_embedding_dimension
        self._plans: dict[bytes | str, Plan] = {}
        self._configs: dict[bytes, _Settings] = {}
        self._digest_start: tuple[str, Any] | None = None

    # -- Responder API
    def generate(self, request: dict, model: str) -> dict:
        """Answer one GenerateContentRequest (REST camelCase; snake_case accepted)."""
        config = request.get("generationConfig")
        if config is None:
            config = request.get("generation_config") or {}
        digest_input = self._model_digest(model).copy()
        # Prompt tokens by modality: TEXT always listed first, the others in the order they appear.
        text_tokens = 0
        other_tokens: dict[str, int] = {}
        last_text = ""
        system = request.get("systemInstruction")
        if system is None:
            system = request.get("system_instruction")
        if system is not None:
            for part in _iter_parts(system):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    text_tokens += (len(text) + 3) // 4
                    digest_input.update(b"\x1es")
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                else:
                    modality = _modality(part)
                    if modality == "TEXT":
                        text_tokens += NON_TEXT_PART_TOKENS
                    else:
                        other_tokens[modality] = other_tokens.get(modality, 0) + NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        for content in _as_contents(request.get("contents")):
            from_user = not (isinstance(content, dict) and content.get("role") == "model")
            digest_input.update(b"\x1eu" if from_user else b"\x1em")
            for part in _iter_parts(content):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    text_tokens += (len(text) + 3) // 4
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                    digest_input.update(_SEP)
                    if from_user and text:
                        last_text = text
                else:
                    modality = _modality(part)
                    if modality == "TEXT":
                        text_tokens += NON_TEXT_PART_TOKENS
                    else:
                        other_tokens[modality] = other_tokens.get(modality, 0) + NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        prompt_tokens = text_tokens + sum(other_tokens.values())
        settings = self._settings(config, model)
        if settings.sampling is not None:
            digest_input.update(settings.sampling)
        digest = digest_input.digest()
        name = _model_name(model)

        thoughts = _thought_tokens(settings.thinking, prompt_tokens)
        include_thoughts = thoughts and settings.include_thoughts
        stops = settings.stops
        candidates = []
        output_tokens = 0
        for index in range(settings.candidates):
            seed = digest if index == 0 else hashlib.blake2b(
                digest + bytes((index,)), digest_size=16).digest()
            if not settings.structured:
                text, finish = self._text(seed, name, last_text, settings.max_tokens)
            else:
                text, finish = self._structured(seed, name, last_text, settings)
            if stops:
                text, finish = self._apply_stops(text, finish, stops)
            tokens = (len(text) + 3) // 4
            output_tokens += tokens
            parts = [{"text": text}]
            if include_thoughts:  # a summary of the thinking comes first, marked as a thought
                parts.insert(0, {"text": f"[emulated {name} thought summary] Considered the request.", "thought": True})
            candidates.append({
                "content": {"role": "model", "parts": parts},
                "finishReason": finish,
                "index": index,
            })
        details = [{"modality": "TEXT", "tokenCount": text_tokens}]
        if other_tokens:
            details += [{"modality": modality, "tokenCount": tokens} for modality, tokens in other_tokens.items()]
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens + thoughts,
            "promptTokensDetails": details,
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return {
            "candidates": candidates,
            "usageMetadata": usage,
            "modelVersion": name,
            "responseId": "emu-" + digest[:10].hex(),
        }

    def embed(self, request: dict, model: str) -> dict:
        """Answer one EmbedContentRequest with a deterministic unit-norm vector."""
        content = request.get("content")
        if content is None:
            content = request.get("contents")
        digest_input = hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=32)
        task_type = get_field(request, "taskType", "task_type")
        title = request.get("title")
        digest_input.update(f"\x1e{task_type or ''}\x1e{title or ''}\x1e".encode())
        tokens = 0
        for item in _as_contents(content):
            for part in _iter_parts(item):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    tokens += (len(text) + 3) // 4
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                    digest_input.update(_SEP)
                else:
                    tokens += NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        dimension = as_int(get_field(request, "outputDimensionality", "output_dimensionality"))
        if dimension is None or dimension <= 0:
            dimension = self._default_dimension(model)
        dimension = min(dimension, MAX_EMBEDDING_DIMENSION)
        raw = struct.unpack(f"<{dimension}h", hashlib.shake_256(digest_input.digest()).digest(2 * dimension))
        norm = math.hypot(*raw) or 1.0
        scale = 1.0 / norm
        return {"embedding": {"values": [x * scale for x in raw]}, "tokenCount": str(tokens)}

    def count_tokens(self, contents: list) -> int:
        """Token estimate of ``contents``: ceil(chars/4) per text part, 258 per other part."""
        total = 0
        for content in _as_contents(contents):
            for part in _iter_parts(content):
                text = part.get("text") if isinstance(part, dict) else part
                total += (len(text) + 3) // 4 if isinstance(text, str) else NON_TEXT_PART_TOKENS
        return total

    # -- internals
    def _model_digest(self, model: str) -> Any:
        """The answer digest's start for a model (a batch asks for one model a million times)."""
        cached = self._digest_start  # one (model, digest) pair, read and replaced whole: workers share it
        if cached is None or cached[0] != model:
            cached = self._digest_start = (model, hashlib.blake2b(model.encode("utf-8", "surrogatepass"),
                                                                  digest_size=16))
        return cached[1]  # only ever copied, never updated

    def _default_dimension(self, model: str) -> int:
        if self.default_embedding_dimension:
            return self.default_embedding_dimension
        return MAX_EMBEDDING_DIMENSION if "gemini-embedding" in model else 768

    @staticmethod
    def _text(seed: bytes, name: str, prompt: str, max_tokens: int | None) -> tuple[str, str]:
        filler = " ".join([FILLER_WORDS[b & 63] for b in seed[1:7 + seed[0] % 7]])
        text = f'{MARKER_TEMPLATE.format(model=name)}re: "{_echo(prompt)}" - {filler}.'
        return _cut(text, max_tokens)

    def _structured(self, seed: bytes, name: str, prompt: str, settings: _Settings) -> tuple[str, str]:
        max_tokens = settings.max_tokens
        if settings.schema is None:
            return self._plain_json(seed, name, prompt, max_tokens)
        try:
            plan = settings.plan
            if plan is None:
                plan = settings.plan = self._plan(settings.schema)
            rng_seed = int.from_bytes(seed[:8], "little")
            value = plan(Rng(rng_seed), False)
        except Exception:  # noqa: BLE001 - a malformed schema must not take the emulator down
            return self._plain_json(seed, name, prompt, max_tokens)
        if settings.mime == "text/x.enum":
            return _cut(value if isinstance(value, str) else _compact_json(value), max_tokens)
        text = _compact_json(value)
        if max_tokens is not None and len(text) > max_tokens * 4:
            # Before cutting (which breaks the JSON), try the smallest valid instance.
            small = plan(Rng(rng_seed), True)
            text = _compact_json(small)
        return _cut(text, max_tokens)

    def _plain_json(self, seed: bytes, name: str, prompt: str, max_tokens: int | None) -> tuple[str, str]:
        """JSON mode without a schema, or with one that cannot be followed."""
        plain, _ = self._text(seed, name, prompt, None)
        return _cut(_compact_json({"emulated": True, "text": plain}), max_tokens)

    def _plan(self, schema: Any) -> Plan:
        # Key order decides the output's property order, and 1, 1.0 and true are == but answer
        # differently, so two schemas share a plan only when they are alike in every way (_exact_key).
        key = _exact_key(schema)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.schema_cache_size:
                self._plans.clear()
            plan = self._plans[key] = compile_schema(schema)
        return plan

    def _settings(self, config: Any, model: str) -> _Settings:
        """What ``config`` decides for ``model``'s answers, worked out once per distinct config and model
        (a batch sends one generationConfig, or a few, with every request)."""
        try:
            key = marshal.dumps((model, config), 2)  # exact, as _exact_key says
        except ValueError:  # not plain data (only a direct caller can send that): nothing to share
            return _Settings(config, _model_name(model))
        settings = self._configs.get(key)
        if settings is None:
            # Made from the key's own copy of the config, so they hold nothing a caller could change.
            settings = _Settings(marshal.loads(key)[1], _model_name(model))
            if len(self._configs) >= self.config_cache_size:
                self._configs.clear()
            self._configs[key] = settings
        return settings

    @staticmethod
    def _apply_stops(text: str, finish: str, stops: Any) -> tuple[str, str]:
        if isinstance(stops, str):
            stops = [stops]
        cut = len(text)
        for stop in stops:
            if isinstance(stop, str) and stop:
                at = text.find(stop)
                if 0 <= at < cut:
                    cut = at
        if cut < len(text):
            return text[:cut], "STOP"
        return text, finish


#: Thinking tokens relative to a dynamic budget's, by ``thinkingLevel`` (Gemini 3).
_THINKING_LEVELS = {"MINIMAL": 0.0, "LOW": 0.5, "MEDIUM": 1.0, "HIGH": 2.0}


def _thinking(model_id: str, thinking_config: Any) -> tuple[float, int | None] | None:
    """How a model thinks with ``thinking_config``: (its share of a dynamic budget's tokens, by
    ``thinkingLevel``; the positive ``thinkingBudget`` that caps them, if any), or None when it does
    not think: a budget of 0, or a model that does not think (``models.thinks``) unless it is given
    a thinking config."""
    config = thinking_config if isinstance(thinking_config, dict) else {}
    if not config and not thinks(model_id):
        return None
    budget = as_int(get_field(config, "thinkingBudget", "thinking_budget"))
    if budget == 0:
        return None
    level = get_field(config, "thinkingLevel", "thinking_level")
    return _THINKING_LEVELS.get(str(level).upper(), 1.0), budget if budget is not None and budget > 0 else None


def _thought_tokens(thinking: tuple[float, int | None] | None, prompt_tokens: int) -> int:
    """How many tokens a model spends thinking (``thinking`` as _thinking tells), deterministically:
    32 plus half the prompt, scaled by ``thinkingLevel``, never more than a positive ``thinkingBudget``."""
    if thinking is None:
        return 0
    share, cap = thinking
    tokens = int((32 + prompt_tokens // 2) * share)
    return min(tokens, cap) if cap is not None else tokens


def _exact_key(value: Any) -> bytes | str:
    """A cache key that two values share only if they are alike in every way: types (1, 1.0 and true
    are == but differ), key order, every character. marshal's version 2 writes a value just so, and
    without back-references (which would depend on how objects happen to be shared); repr() is as
    exact for JSON data but about three times slower, and serves what marshal cannot write."""
    try:
        return marshal.dumps(value, 2)
    except ValueError:
        return repr(value)


class _Settings:
    """What a generationConfig decides for every answer of one model (EmulatedResponder._settings)."""

    __slots__ = ("sampling", "mime", "structured", "schema", "plan", "max_tokens", "stops", "candidates",
                 "thinking", "include_thoughts")

    def __init__(self, config: Any, name: str) -> None:
        # Sampling settings pick a different (still deterministic) answer, so that e.g. the
        # same prompt with another `seed` or temperature varies, as with a real model. Sorted,
        # so that key order (or camel vs snake case) does not matter.
        sampling = sorted(f"{_SAMPLING_KEYS[key]}={value!r}" for key, value in config.items()
                          if key in _SAMPLING_KEYS and value is not None)
        #: What the answer's digest takes in after the prompt, if anything.
        self.sampling = "\x1e".join(sampling).encode() if sampling else None
        self.mime = mime = get_field(config, "responseMimeType", "response_mime_type") or "text/plain"
        self.structured = isinstance(mime, str) and (mime.startswith("application/json") or mime == "text/x.enum")
        schema = None
        if self.structured:
            schema = get_field(config, "responseJsonSchema", "response_json_schema")
            if schema is None:
                schema = get_field(config, "responseSchema", "response_schema")
        self.schema = schema
        self.plan: Plan | None = None  # the schema's, once EmulatedResponder._structured compiled it
        max_tokens = as_int(get_field(config, "maxOutputTokens", "max_output_tokens"))
        self.max_tokens = None if max_tokens is not None and max_tokens <= 0 else max_tokens  # proto3: 0 is unset
        self.stops = get_field(config, "stopSequences", "stop_sequences")
        self.candidates = max(1, min(as_int(get_field(config, "candidateCount", "candidate_count")) or 1, 8))
        thinking_config = get_field(config, "thinkingConfig", "thinking_config")
        self.thinking = _thinking(name, thinking_config)
        # A thought summary comes only with thoughts: the flag is not read for a model that does not think.
        self.include_thoughts = self.thinking is not None and get_field(thinking_config or {}, "includeThoughts",
                                                                   "include_thoughts")


def _cut(text: str, max_tokens: int | None) -> tuple[str, str]:
    """Respect maxOutputTokens under the chars/4 estimate."""
    if max_tokens is not None and max_tokens >= 0 and len(text) > max_tokens * 4:
        return text[: max_tokens * 4], "MAX_TOKENS"
    return text, "STOP"
