"""The wire form of a task's requests: a :class:`~batchd.task.TaskRequest` → the line batchd sends.

A chunk's requests file holds one ``{"key": …, "request": …}`` line per request, the request being the
camelCase REST GenerateContentRequest (or EmbedContentRequest) google-genai would send for the same
call: inline chunks post the text of these requests as it is (:func:`inlined_request`), file
chunks upload them. Encoding them here, instead of through the SDK's pydantic types, keeps a million
requests at a few microseconds each while the bytes stay the SDK's (tests/test_provider.py compares them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps uses for str
from typing import TYPE_CHECKING, Any

from google.genai import types

if TYPE_CHECKING:
    from batchd.task import TaskRequest


# Generation settings in the SDK's snake_case -> their GenerationConfig field on the wire. The SDK's
# converter (batches._GenerateContentConfig_to_mldev) renames these and passes values through
# unchanged, so doing the same here gives the file path exactly the inline path's wire request.
# thinking_config's inner keys are passed through as given, as the SDK does.
_GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "candidate_count": "candidateCount",
    "max_output_tokens": "maxOutputTokens",
    "stop_sequences": "stopSequences",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "response_mime_type": "responseMimeType",
    "response_json_schema": "responseJsonSchema",
    "response_logprobs": "responseLogprobs",
    "logprobs": "logprobs",
    "response_modalities": "responseModalities",
    "media_resolution": "mediaResolution",
    "thinking_config": "thinkingConfig",
}
_SETTING_BY_GENERATION_CONFIG_FIELD = {wire_name: name for name, wire_name in _GENERATION_CONFIG_FIELDS.items()}
# Settings that sit beside generationConfig in the request.
_REQUEST_LEVEL_SETTINGS = ("system_instruction", "safety_settings")

_MAX_CACHED_OVERRIDE_TAILS = 256

#: Every generation setting RequestEncoder accepts.
GENERATION_SETTINGS = frozenset(_GENERATION_CONFIG_FIELDS) | frozenset(_REQUEST_LEVEL_SETTINGS)


def _identity_if_unhashable(value: Any) -> Any:
    """A cache key part for a setting value.

    A JSON schema is a dict, so unhashable, but a task hands the same schema object to every request
    of a job: keyed by identity, its encoding is reused instead of redone a million times.
    """
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _user_content(text: str) -> dict[str, Any]:
    return {"parts": [{"text": text}], "role": "user"}


def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Known settings with None (meaning "not set") dropped."""
    unknown = settings.keys() - GENERATION_SETTINGS
    if unknown:
        raise ValueError(
            f"unsupported generation settings {sorted(unknown)}; supported: {sorted(GENERATION_SETTINGS)}"
            " (for an OpenAPI response_schema use response_json_schema)"
        )
    system_instruction = settings.get("system_instruction")
    if system_instruction is not None and not isinstance(system_instruction, str):
        raise ValueError("system_instruction must be a string")
    return {name: value for name, value in settings.items() if value is not None}


def _wire_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The camelCase GenerateContentRequest fields, other than contents, for these settings."""
    fields: dict[str, Any] = {}
    if "system_instruction" in settings:
        fields["systemInstruction"] = _user_content(settings["system_instruction"])
    if "safety_settings" in settings:
        fields["safetySettings"] = settings["safety_settings"]
    generation_config = {
        wire_name: settings[name] for name, wire_name in _GENERATION_CONFIG_FIELDS.items() if name in settings
    }
    if generation_config:
        fields["generationConfig"] = generation_config
    return fields


def _json_tail(fields: Mapping[str, Any]) -> str:
    """``fields`` as JSON object members to follow ``"contents":…`` (empty when there are none)."""
    if not fields:
        return ""
    return "," + json.dumps(fields, ensure_ascii=False, separators=(",", ":"))[1:-1]


class RequestEncoder:
    """Turns (key, prompt, per-request overrides) into batch requests, for one job's default settings.

    Settings are snake_case SDK names (``GENERATION_SETTINGS``); None means "not set", so an override
    of None removes a default. The input-file line and the inline request put the same
    GenerateContentRequest on the wire. Requests do not name the model: the batch does.
    """

    def __init__(self, model: str, defaults: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.defaults = _checked_settings(defaults or {})
        # The part of every request line that only depends on the job's settings, encoded once.
        self._default_tail = _json_tail(_wire_fields(self.defaults))
        # Per-request overrides usually come from a handful of variants (say, three temperatures), so
        # their encoded tails are kept too, up to a bound (unhashable values, such as a schema, by identity).
        self._override_tails: dict[tuple[tuple[str, Any], ...], tuple[str, Mapping[str, Any]]] = {}
        # Most often every request hands over the very same overrides object: that needs no key at all.
        self._last_overrides: Mapping[str, Any] | None = None
        self._last_tail = ""

    def settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The job's defaults with ``overrides`` applied."""
        if not overrides:
            return self.defaults
        return _checked_settings({**self.defaults, **overrides})

    def wire_request(self, prompt: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The camelCase REST GenerateContentRequest for one prompt."""
        return {"contents": [_user_content(prompt)], **_wire_fields(self.settings(overrides))}

    def encode(self, request: TaskRequest) -> str:
        """``jsonl_line`` for a task's request; its files (resolved :class:`batchd.media.MediaRef`) are
        parts before the prompt's text."""
        if request.files:
            parts = [ref.part() for ref in request.files]
            tail = self._override_tail(request.config) if request.config else self._default_tail
            parts_json = json.dumps([*parts, {"text": request.prompt}], ensure_ascii=False, separators=(",", ":"))
            return (f'{{"key":{_json_string(request.key)},"request":{{"contents":[{{"parts":{parts_json},'
                    f'"role":"user"}}]{tail}}}}}')
        return self.jsonl_line(request.key, request.prompt, request.config)

    def jsonl_line(self, key: str, prompt: str, overrides: Mapping[str, Any] | None = None) -> str:
        """One line of a batch input file, ``{"key": …, "request": {…}}``, without the newline.

        This runs once per request of the largest jobs, so the request is written as text: the same shape
        as ``wire_request`` (a test checks they agree), with the settings part encoded once per job.
        """
        tail = self._override_tail(overrides) if overrides else self._default_tail
        return (
            f'{{"key":{_json_string(key)},"request":{{"contents":[{{"parts":[{{"text":{_json_string(prompt)}}}],'
            f'"role":"user"}}]{tail}}}}}'
        )

    def _override_tail(self, overrides: Mapping[str, Any]) -> str:
        if overrides is self._last_overrides:
            return self._last_tail
        tail = self._cached_override_tail(overrides)
        self._last_overrides, self._last_tail = overrides, tail  # kept alive here, so its id is not reused
        return tail

    def _cached_override_tail(self, overrides: Mapping[str, Any]) -> str:
        cache_key = tuple((name, _identity_if_unhashable(value)) for name, value in overrides.items())
        cached = self._override_tails.get(cache_key)
        if cached is not None:
            return cached[0]
        tail = _json_tail(_wire_fields(self.settings(overrides)))
        if len(self._override_tails) < _MAX_CACHED_OVERRIDE_TAILS:
            # The overrides are kept with their tail so the ids in the key stay theirs.
            self._override_tails[cache_key] = (tail, overrides)
        return tail

    def inline(self, key: str, prompt: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An SDK InlinedRequest dict; the key travels in ``metadata`` (which the service may drop)."""
        request: dict[str, Any] = {"contents": [_user_content(prompt)], "metadata": {"key": key}}
        settings = self.settings(overrides)
        if settings:
            request["config"] = dict(settings)
        return request

    @staticmethod
    def inline_from_line(line: Mapping[str, Any]) -> dict[str, Any]:
        """The SDK InlinedRequest dict for a parsed input-file line; the SDK sends the same request.

        Lets a job be written to its input file once and still go inline when it turns out small.
        """
        request = line["request"]
        config: dict[str, Any] = {}
        for wire_name, value in (request.get("generationConfig") or {}).items():
            try:
                config[_SETTING_BY_GENERATION_CONFIG_FIELD[wire_name]] = value
            except KeyError:
                raise ValueError(f"request {line.get('key')!r}: unsupported generationConfig.{wire_name}") from None
        if "systemInstruction" in request:
            config["system_instruction"] = request["systemInstruction"]  # a Content; the SDK sends it as is
        if "safetySettings" in request:
            config["safety_settings"] = request["safetySettings"]
        inlined: dict[str, Any] = {"contents": request["contents"], "metadata": {"key": line["key"]}}
        if config:
            inlined["config"] = config
        return inlined


# EmbedContentConfig settings in the SDK's snake_case -> their EmbedContentRequest field on the wire, as
# the SDK's converter (batches._EmbedContentConfig_to_mldev) renames them for every inline request.
#: How a requests-file line starts, and what follows its key (RequestEncoder writes them so).
_LINE_HEAD = '{"key":'
_REQUEST_FIELD = ',"request":'
_scan_key = json.JSONDecoder().raw_decode


def inlined_request(line: str) -> str:
    """The JSON of the InlinedRequest a requests-file line stands for: ``{"request": …, "metadata": {"key": …}}``.

    A line as the encoders write it, ``{"key":"…","request":{…}}``, keeps the text of its request as it
    is: only the key is decoded to find where it ends. Why: an inline create of 100 requests would
    otherwise decode and encode each of them again on its way out, and those are the GIL-holding
    microseconds that make the loop wait. Any other line (written by hand, reordered) goes through
    :mod:`json`.
    """
    line = line.rstrip("\n")
    if line.startswith(_LINE_HEAD) and line.endswith("}"):
        try:
            key, end = _scan_key(line, len(_LINE_HEAD))
        except ValueError:
            key, end = None, 0
        if isinstance(key, str) and line.startswith(_REQUEST_FIELD, end):
            request, key_json = line[end + len(_REQUEST_FIELD):-1], line[len(_LINE_HEAD):end]
            return f'{{"request":{request},"metadata":{{"key":{key_json}}}}}'
    parsed = json.loads(line)
    return json.dumps({"request": parsed["request"], "metadata": {"key": parsed["key"]}}, ensure_ascii=False,
                      separators=(",", ":"))


_EMBED_CONFIG_FIELDS = {"task_type": "taskType", "title": "title", "output_dimensionality": "outputDimensionality"}
_SETTING_BY_EMBED_FIELD = {wire_name: name for name, wire_name in _EMBED_CONFIG_FIELDS.items()}

#: Every embedding setting EmbedRequestEncoder accepts.
EMBED_SETTINGS = frozenset(_EMBED_CONFIG_FIELDS)


def embed_wire_request(text: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The camelCase REST EmbedContentRequest for one text: what ``create_embeddings`` sends inline for
    it, and what an input-file line holds (``{"key", "request": …}``). None means "not set"."""
    unknown = settings.keys() - EMBED_SETTINGS
    if unknown:
        raise ValueError(f"unsupported embedding settings {sorted(unknown)}; supported: {sorted(EMBED_SETTINGS)}")
    request: dict[str, Any] = {"content": _user_content(text)}
    for name, wire_name in _EMBED_CONFIG_FIELDS.items():
        if settings.get(name) is not None:
            request[wire_name] = settings[name]
    return request


class EmbedRequestEncoder:
    """Turns an embed task's requests into batch input-file lines, ``{"key": …, "request":
    EmbedContentRequest}``. Requests do not name the model: the batch does."""

    def __init__(self) -> None:
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def encode(self, request: TaskRequest) -> str:
        return self._dumps({"key": request.key, "request": embed_wire_request(request.prompt, request.config)})


def inline_embeddings_source(lines: Iterable[Mapping[str, Any]]) -> types.EmbeddingsBatchJobSource:
    """The ``src`` of ``create_embeddings`` for input-file lines of EmbedContentRequests: their contents
    and the one config the SDK copies into each request (so lines with different settings cannot go
    inline together; an embed task gives every request of a job the same)."""
    contents: list[dict[str, Any]] = []
    config: dict[str, Any] | None = None
    for line in lines:
        request = line["request"]
        settings = {_SETTING_BY_EMBED_FIELD[field]: value for field, value in request.items()
                    if field in _SETTING_BY_EMBED_FIELD}
        if config is None:
            config = settings
        elif settings != config:
            raise ValueError(f"request {line.get('key')!r}: inline embedding requests must share their settings "
                             f"(the SDK sends one config for all): {settings} differs from {config}")
        contents.append(request["content"])
    return types.EmbeddingsBatchJobSource(inlined_requests=types.EmbedContentBatch(contents=contents,
                                                                                   config=config or None))
