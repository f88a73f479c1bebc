"""Unit tests of the emulator's deterministic responder (no server involved)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jsonschema
import pytest

from batchd.emulator.responder import (
    NON_TEXT_PART_TOKENS,
    EmulatedResponder,
    Responder,
    estimate_tokens,
    load_responder,
)

MODEL = "gemini-2.5-flash"

SENTIMENT = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "rationale": {"type": "string"},
    },
    "required": ["label", "score", "rationale"],
    "additionalProperties": False,
}


def request(text: str, **config) -> dict:
    body: dict = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        body["generationConfig"] = config
    return body


def text_of(response: dict, index: int = 0) -> str:
    return response["candidates"][index]["content"]["parts"][0]["text"]


@pytest.fixture()
def responder() -> EmulatedResponder:
    return EmulatedResponder()


# ------------------------------------------------------------------------------- plain text


def test_response_shape(responder):
    response = responder.generate(request("Tell me a joke."), "models/" + MODEL)
    (candidate,) = response["candidates"]
    assert candidate["content"]["role"] == "model"
    assert candidate["finishReason"] == "STOP"
    assert candidate["index"] == 0
    usage = response["usageMetadata"]
    # gemini-2.5-flash thinks by default: its thinking tokens are billed and counted in the total.
    assert usage["thoughtsTokenCount"] > 0
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"] + \
        usage["thoughtsTokenCount"]
    assert response["modelVersion"] == MODEL
    assert response["responseId"].startswith("emu-")
    json.dumps(response)  # plain JSON types only


def test_text_is_marked_and_echoes_the_prompt(responder):
    text = text_of(responder.generate(request("Why is the sky blue?"), MODEL))
    assert text.startswith(f"[emulated {MODEL}] ")
    assert "Why is the sky blue?" in text
    assert 20 <= estimate_tokens(text) <= 60


def test_long_prompt_echoes_head_and_tail(responder):
    prompt = "Translate into French: " + " ".join(f"w{i}" for i in range(200)) + " final words here"
    text = text_of(responder.generate(request(prompt), MODEL))
    assert "Translate into French:" in text and "final words here" in text
    assert estimate_tokens(text) <= 60


def test_deterministic_across_instances(responder):
    body = request("Describe photosynthesis.", temperature=0.9)
    first = responder.generate(body, MODEL)
    assert EmulatedResponder().generate(body, MODEL) == first
    assert responder.generate(json.loads(json.dumps(body)), MODEL) == first


def test_deterministic_across_processes_with_different_hash_seeds():
    code = (
        "import json; from batchd.emulator.responder import EmulatedResponder as R; r = R();"
        "print(json.dumps([r.generate({'contents':[{'parts':[{'text':'same'}]}]}, 'm'),"
        " r.generate({'contents':[{'parts':[{'text':'x'}]}], 'generationConfig':"
        " {'responseMimeType':'application/json','responseJsonSchema':"
        + repr(SENTIMENT)
        + "}}, 'm'), r.embed({'content':{'parts':[{'text':'e'}]},'outputDimensionality':4}, 'm')]))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_different_prompts_give_different_texts(responder):
    texts = {text_of(responder.generate(request(f"Question number {i}"), MODEL)) for i in range(200)}
    assert len(texts) == 200
    # Same prompt head (a batch of translations): still different and distinguishable.
    texts = {text_of(responder.generate(request(f"Translate: sentence {i} ends"), MODEL))
             for i in range(50)}
    assert len(texts) == 50


def test_sampling_settings_pick_another_answer(responder):
    texts = {text_of(responder.generate(request("same prompt", seed=seed), MODEL)) for seed in range(10)}
    assert len(texts) == 10
    camel = {"contents": [{"parts": [{"text": "p"}]}], "generationConfig": {"topK": 3, "temperature": 0.5}}
    snake = {"contents": [{"parts": [{"text": "p"}]}], "generation_config": {"temperature": 0.5, "top_k": 3}}
    assert responder.generate(camel, MODEL) == responder.generate(snake, MODEL)


def test_max_output_tokens_cuts_the_same_answer(responder):
    full = text_of(responder.generate(request("rivers", temperature=0.3), MODEL))
    cut = text_of(responder.generate(request("rivers", temperature=0.3, maxOutputTokens=5), MODEL))
    assert full.startswith(cut) and len(cut) == 20


def test_model_changes_answer(responder):
    body = request("hello")
    a, b = responder.generate(body, "gemini-2.5-flash"), responder.generate(body, "gemini-2.5-pro")
    assert text_of(a) != text_of(b)
    assert "[emulated gemini-2.5-pro]" in text_of(b)


def test_prompt_token_estimate_includes_system_and_non_text_parts(responder):
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "abcdefgh"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
            {"role": "model", "parts": [{"text": "abc"}]},
            {"role": "user", "parts": [{"fileData": {"fileUri": "files/x", "mimeType": "image/png"}}, {"text": "a"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
    }
    usage = responder.generate(body, MODEL)["usageMetadata"]
    assert usage["promptTokenCount"] == 2 + 1 + 1 + 3 + 2 * NON_TEXT_PART_TOKENS
    assert usage["candidatesTokenCount"] == estimate_tokens(text_of(responder.generate(body, MODEL)))


def test_inline_data_changes_the_answer(responder):
    def body(data: str) -> dict:
        return {"contents": [{"parts": [{"text": "describe"}, {"inlineData": {"mimeType": "image/png", "data": data}}]}]}

    assert text_of(responder.generate(body("AAAA"), MODEL)) != text_of(responder.generate(body("BBBB"), MODEL))


@pytest.mark.parametrize("limit", [1, 3, 10, 25])
def test_max_output_tokens_cuts_and_reports_max_tokens(responder, limit):
    response = responder.generate(request("Write a long essay about rivers.", maxOutputTokens=limit), MODEL)
    candidate = response["candidates"][0]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert response["usageMetadata"]["candidatesTokenCount"] <= limit
    assert len(text_of(response)) <= limit * 4
    assert text_of(response).startswith("[emulated"[: limit * 4])


def test_large_max_output_tokens_is_stop(responder):
    response = responder.generate(request("short", maxOutputTokens=1000), MODEL)
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_snake_case_request_keys(responder):
    camel = {
        "contents": [{"parts": [{"text": "hello"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 4},
    }
    snake = {
        "contents": [{"parts": [{"text": "hello"}]}],
        "system_instruction": {"parts": [{"text": "Be brief."}]},
        "generation_config": {"max_output_tokens": 4},
    }
    assert responder.generate(snake, MODEL) == responder.generate(camel, MODEL)
    assert responder.generate(snake, MODEL)["candidates"][0]["finishReason"] == "MAX_TOKENS"


def test_contents_as_plain_string(responder):
    assert responder.generate({"contents": "hello"}, MODEL) == responder.generate(request("hello"), MODEL)


def test_odd_input_does_not_raise(responder):
    for body in ({}, {"contents": []}, {"contents": [{}]}, {"contents": [{"parts": [{}]}]},
                 {"contents": [{"parts": [{"text": ""}]}]}, {"contents": None, "generationConfig": None}):
        response = responder.generate(body, MODEL)
        assert text_of(response).startswith("[emulated")


def test_stop_sequences(responder):
    full = text_of(responder.generate(request("Why is the sky blue?"), MODEL))
    response = responder.generate(request("Why is the sky blue?", stopSequences=["sky"]), MODEL)
    assert text_of(response) == full[: full.index("sky")]
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_candidate_count(responder):
    response = responder.generate(request("hello", candidateCount=3), MODEL)
    assert [c["index"] for c in response["candidates"]] == [0, 1, 2]
    assert len({text_of(response, i) for i in range(3)}) == 3
    assert response["usageMetadata"]["candidatesTokenCount"] == sum(
        estimate_tokens(text_of(response, i)) for i in range(3))


# ------------------------------------------------------------------------------- JSON mode


def openapi_to_json_schema(schema):
    """Test helper: the Gemini OpenAPI subset as JSON Schema, for validating with jsonschema."""
    if isinstance(schema, list):
        return [openapi_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type":
            out["type"] = value.lower()
        elif key in ("properties", "defs", "$defs"):
            out["$defs" if key == "defs" else key] = {k: openapi_to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = openapi_to_json_schema(value)
        elif key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"):
            out[key] = int(value)
        elif key == "ref":
            out["$ref"] = value.replace("#/defs/", "#/$defs/")
        elif key in ("nullable", "propertyOrdering", "format", "example"):
            continue
        else:
            out[key] = value
    if schema.get("format") not in (None, "enum"):
        out["format"] = schema["format"]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


JSON_SCHEMAS = {
    "sentiment": SENTIMENT,
    "nested": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 3, "maxLength": 40},
            "author": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                "required": ["name", "age"],
            },
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
            "chapters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"n": {"type": "integer"}, "pages": {"type": "array", "items": {"type": "number"}}},
                    "required": ["n", "pages"],
                },
            },
            "published": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["title", "author", "tags", "chapters"],
    },
    "defs_refs": {
        "$defs": {
            "Address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"],
            },
            "Person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "home": {"$ref": "#/$defs/Address"},
                               "friends": {"type": "array", "items": {"$ref": "#/$defs/Person"}}},
                "required": ["name", "home", "friends"],
            },
        },
        "type": "object",
        "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "minItems": 1}},
        "required": ["people"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "string", "format": "email"}, {"type": "integer", "minimum": 5}]},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Maybe"},
            "choice": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"const": "x"}, "maxItems": 1}]},
        },
        "required": ["value", "maybe", "choice"],
    },
    "formats_and_bounds": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "at": {"type": "string", "format": "date-time"},
            "id": {"type": "string", "format": "uuid"},
            "site": {"type": "string", "format": "uri"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2,4}$"},
            "pct": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "step": {"type": "number", "multipleOf": 0.5, "minimum": 1, "maximum": 3},
            "even": {"type": "integer", "multipleOf": 2, "minimum": 3, "maximum": 9},
            "neg": {"type": "integer", "maximum": -10},
            "kind": {"const": "fixed"},
            "either": {"type": ["integer", "string"]},
            "opt": {"type": ["string", "null"], "maxLength": 5},
            "uniq": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "minItems": 3},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
            "bag": {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
        },
        "required": ["day", "at", "id", "site", "code", "pct", "step", "even", "neg", "kind",
                     "either", "opt", "uniq", "pair", "bag"],
    },
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ],
    },
    "top_level_array": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "minItems": 1},
    "recursive_tree": {
        "$ref": "#/definitions/node",
        "definitions": {
            "node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/definitions/node"}}},
                     "required": ["children"]},
        },
    },
}

OPENAPI_SCHEMAS = {
    "sentiment_upper": {
        "type": "OBJECT",
        "properties": {
            "label": {"type": "STRING", "format": "enum", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "NUMBER", "minimum": 0, "maximum": 1},
            "rationale": {"type": "STRING"},
        },
        "required": ["label", "score", "rationale"],
        "propertyOrdering": ["rationale", "label", "score"],
    },
    "nested_upper": {
        "type": "OBJECT",
        "properties": {
            "items": {
                "type": "ARRAY",
                "minItems": "2",
                "maxItems": "3",
                "items": {
                    "type": "OBJECT",
                    "properties": {
                        "name": {"type": "STRING", "nullable": True},
                        "count": {"type": "INTEGER", "format": "int32"},
                        "ok": {"type": "BOOLEAN"},
                        "when": {"type": "STRING", "format": "date-time"},
                    },
                    "required": ["name", "count", "ok", "when"],
                },
            },
            "summary": {"type": "STRING", "maxLength": "12"},
        },
        "required": ["items", "summary"],
    },
    "defs_and_anyof_lower": {
        "type": "object",
        "defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "properties": {
            "pet": {"ref": "#/defs/Pet"},
            "either": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]},
        },
        "required": ["pet", "either"],
    },
}


def generate_json(responder, schema, prompt="Classify: I loved it.", key="responseJsonSchema", **config):
    body = request(prompt, responseMimeType="application/json", **{key: schema}, **config)
    response = responder.generate(body, MODEL)
    return response, text_of(response)


def validator_for(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("name", sorted(JSON_SCHEMAS))
def test_json_mode_validates(responder, name):
    schema = JSON_SCHEMAS[name]
    validator = validator_for(schema)
    outputs = set()
    for i in range(40):
        response, text = generate_json(responder, schema, prompt=f"item {i}")
        assert response["candidates"][0]["finishReason"] == "STOP"
        data = json.loads(text)
        assert text == json.dumps(data, separators=(",", ":"), ensure_ascii=False)  # compact
        validator.validate(data)
        outputs.add(text)
    assert len(outputs) > 1  # the prompt seeds the values


@pytest.mark.parametrize("name", sorted(OPENAPI_SCHEMAS))
def test_openapi_response_schema_validates(responder, name):
    schema = OPENAPI_SCHEMAS[name]
    validator = validator_for(openapi_to_json_schema(schema))
    for i in range(40):
        _, text = generate_json(responder, schema, prompt=f"item {i}", key="responseSchema")
        validator.validate(json.loads(text))


def test_full_instance_has_all_listed_properties_at_every_level(responder):
    data = json.loads(generate_json(responder, JSON_SCHEMAS["nested"])[1])
    assert set(data) == set(JSON_SCHEMAS["nested"]["properties"])
    assert data["chapters"] and all(chapter["pages"] for chapter in data["chapters"])
    people = json.loads(generate_json(responder, JSON_SCHEMAS["defs_refs"])[1])["people"]
    assert people[0]["home"]["street"].startswith("emulated street")


def test_formats_are_well_formed(responder):
    from datetime import date, datetime
    from urllib.parse import urlparse

    for i in range(20):
        data = json.loads(generate_json(responder, JSON_SCHEMAS["formats_and_bounds"], prompt=str(i))[1])
        date.fromisoformat(data["day"])
        assert datetime.fromisoformat(data["at"].replace("Z", "+00:00")).tzinfo is not None
        site = urlparse(data["site"])
        assert site.scheme == "https" and site.netloc


def test_min_and_max_properties(responder):
    schema = {
        "type": "object",
        "properties": {name: {"type": "integer"} for name in "abcdef"},
        "required": ["f"],
        "maxProperties": 3,
    }
    data = json.loads(generate_json(responder, schema)[1])
    assert "f" in data and len(data) == 3
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
              "minProperties": 2, "additionalProperties": False}
    for max_tokens in (None, 5):
        config = {"maxOutputTokens": max_tokens} if max_tokens else {}
        response, text = generate_json(responder, schema, **config)
        if response["candidates"][0]["finishReason"] == "STOP":
            validator_for(schema).validate(json.loads(text))


def test_openapi_numeric_enum(responder):
    schema = {"type": "INTEGER", "format": "enum", "enum": ["1", "2", "3"]}
    value = json.loads(generate_json(responder, schema, key="responseSchema")[1])
    assert value in (1, 2, 3)


def test_other_mime_types_get_plain_text(responder):
    body = request("hello", responseMimeType="text/markdown")
    assert text_of(responder.generate(body, MODEL)).startswith("[emulated")


def test_pydantic_models_accept_the_output(responder):
    """What SDK users pass: a pydantic model's JSON schema (or the SDK's OpenAPI form of it)."""
    import datetime
    import enum
    from typing import Literal, Optional

    import pydantic

    class Mood(str, enum.Enum):
        positive = "positive"
        negative = "negative"

    class Address(pydantic.BaseModel):
        street: str
        zip: Optional[str] = None

    class Person(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=0, le=120)
        tags: list[str]
        mood: Mood
        kind: Literal["a", "b"]
        home: Address
        others: list[Address] = []
        score: float = pydantic.Field(ge=0, le=1)
        born: datetime.date
        maybe: Optional[int] = None

    for i in range(20):
        _, text = generate_json(responder, Person.model_json_schema(), prompt=f"person {i}")
        person = Person.model_validate_json(text)
        assert person.name.startswith("emulated")


def test_property_ordering_is_honoured(responder):
    _, text = generate_json(responder, OPENAPI_SCHEMAS["sentiment_upper"], key="responseSchema")
    assert list(json.loads(text)) == ["rationale", "label", "score"]


def test_json_strings_are_marked(responder):
    _, text = generate_json(responder, SENTIMENT)
    data = json.loads(text)
    assert data["rationale"].startswith("emulated")
    assert data["label"] in ("positive", "negative", "neutral")
    assert 0 <= data["score"] <= 1


def test_json_mode_snake_case_schema_keys(responder):
    schema = {
        "type": "OBJECT",
        "properties": {
            "b": {"type": "ARRAY", "items": {"type": "STRING"}, "min_items": 2, "max_items": 2},
            "a": {"any_of": [{"type": "INTEGER", "minimum": 1, "maximum": 1}]},
        },
        "required": ["a", "b"],
        "property_ordering": ["b", "a"],
    }
    body = {"contents": [{"parts": [{"text": "x"}]}],
            "generation_config": {"response_mime_type": "application/json", "response_schema": schema}}
    data = json.loads(text_of(responder.generate(body, MODEL)))
    assert list(data) == ["b", "a"] and len(data["b"]) == 2 and data["a"] == 1


def test_json_mode_prefers_response_json_schema(responder):
    body = request("x", responseMimeType="application/json",
                   responseSchema={"type": "STRING"}, responseJsonSchema={"type": "integer"})
    assert isinstance(json.loads(text_of(responder.generate(body, MODEL))), int)


def test_json_mode_without_schema(responder):
    body = request("hello", responseMimeType="application/json")
    data = json.loads(text_of(responder.generate(body, MODEL)))
    assert data["emulated"] is True and data["text"].startswith("[emulated")


def test_enum_mime_type(responder):
    body = request("pick", responseMimeType="text/x.enum",
                   responseSchema={"type": "STRING", "format": "enum", "enum": ["red", "green"]})
    assert text_of(responder.generate(body, MODEL)) in ("red", "green")


def test_json_mode_small_budget_falls_back_to_minimal_instance(responder):
    schema = JSON_SCHEMAS["nested"]
    full_response, full = generate_json(responder, schema)
    limit = (len(full) + 3) // 4 - 5
    response, text = generate_json(responder, schema, maxOutputTokens=limit)
    assert response["candidates"][0]["finishReason"] == "STOP"
    assert len(text) <= limit * 4
    validator_for(schema).validate(json.loads(text))


def test_json_mode_tiny_budget_is_cut(responder):
    response, text = generate_json(responder, SENTIMENT, maxOutputTokens=2)
    assert response["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert len(text) <= 8 and response["usageMetadata"]["candidatesTokenCount"] <= 2


def test_json_mode_is_deterministic(responder):
    first = generate_json(responder, JSON_SCHEMAS["formats_and_bounds"])
    assert generate_json(EmulatedResponder(), JSON_SCHEMAS["formats_and_bounds"]) == first


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"},
    {"type": "object", "properties": ["a"], "propertyOrdering": "a"},
    {"type": "array", "items": [1, 2], "minItems": "x"},
    {"type": 7, "enum": {}},
    {"anyOf": []},
    {"type": "string", "pattern": "(unclosed"},
    "not a schema",
])
def test_malformed_schema_does_not_raise(responder, schema):
    response, text = generate_json(responder, schema)
    json.loads(text)


def test_parts_given_as_strings(responder):
    body = {"contents": [{"parts": ["abcdefgh"]}]}
    assert responder.generate(body, MODEL)["usageMetadata"]["promptTokenCount"] == 2


def test_unresolvable_ref_does_not_raise(responder):
    schema = {"type": "object", "properties": {"x": {"$ref": "other.json#/x"}, "y": {"$ref": "#/nope"}},
              "required": ["x", "y"]}
    data = json.loads(generate_json(responder, schema)[1])
    assert set(data) == {"x", "y"}


# ------------------------------------------------------------------------------- embeddings


def embed_request(text: str, **extra) -> dict:
    return {"content": {"parts": [{"text": text}], "role": "user"}, **extra}


@pytest.mark.parametrize("dimension", [1, 3, 128, 768, 3072])
def test_embedding_dimension_and_unit_norm(responder, dimension):
    result = responder.embed(embed_request("hello", outputDimensionality=dimension), "gemini-embedding-001")
    values = result["embedding"]["values"]
    assert len(values) == dimension
    assert all(isinstance(v, float) for v in values)
    assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, rel_tol=1e-9)


def test_embedding_defaults_and_token_count(responder):
    assert len(responder.embed(embed_request("a"), "models/gemini-embedding-001")["embedding"]["values"]) == 3072
    assert len(responder.embed(embed_request("a"), "text-embedding-004")["embedding"]["values"]) == 768
    custom = EmulatedResponder(default_embedding_dimension=16)
    assert len(custom.embed(embed_request("a"), "gemini-embedding-001")["embedding"]["values"]) == 16
    assert responder.embed(embed_request("12345"), "m")["tokenCount"] == "2"


def test_embedding_determinism_and_variety(responder):
    a = responder.embed(embed_request("one", outputDimensionality=8), "gemini-embedding-001")
    assert EmulatedResponder().embed(embed_request("one", outputDimensionality=8), "gemini-embedding-001") == a
    b = responder.embed(embed_request("two", outputDimensionality=8), "gemini-embedding-001")
    assert a != b
    snake = responder.embed({"content": {"parts": [{"text": "one"}]}, "output_dimensionality": 8},
                            "gemini-embedding-001")
    assert snake == a


# ------------------------------------------------------------------------------- count_tokens and plumbing


def test_count_tokens(responder):
    assert responder.count_tokens([{"role": "user", "parts": [{"text": "How many tokens is this?"}]}]) == 6
    assert responder.count_tokens("abcd") == 1
    assert responder.count_tokens([]) == 0
    assert responder.count_tokens([{"parts": [{"text": "abcde"}, {"inlineData": {"data": "x"}}]}]) == (
        2 + NON_TEXT_PART_TOKENS)
    body = request("Some prompt text of moderate length.")
    assert responder.generate(body, MODEL)["usageMetadata"]["promptTokenCount"] == responder.count_tokens(
        body["contents"])


def test_protocol_and_loader():
    assert isinstance(EmulatedResponder(), Responder)
    loaded = load_responder("batchd.emulator.responder:EmulatedResponder")
    assert isinstance(loaded, EmulatedResponder)
    with pytest.raises(TypeError):
        load_responder("json:JSONDecoder")
    with pytest.raises(ValueError):
        load_responder("batchd.emulator.responder")


# ------------------------------------------------------------------------------- random schemas


def random_schema(rng, depth=0):
    """A random, satisfiable schema from the keywords the responder supports."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "type_list"]
    if depth < 3:
        kinds += ["object", "object", "array", "array", "any_of", "all_of", "ref"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema = {"type": "string"}
        choice = rng.random()
        if choice < 0.25:
            schema["format"] = rng.choice(["date", "email", "uuid", "ipv4", "ipv6", "hostname", "uri", "date-time"])
        elif choice < 0.45:
            schema["pattern"] = rng.choice(["^[a-z]+$", "^\\d{3}-\\d{4}$", "^(foo|bar)[0-9]?$", "^[A-F0-9]{8}$",
                                            "^\\w+@\\w+\\.com$", "^[^0-9]{2,5}$", "x"])
        else:
            if rng.random() < 0.4:
                schema["minLength"] = rng.randint(0, 30)
            if rng.random() < 0.4:
                schema["maxLength"] = schema.get("minLength", 0) + rng.randint(0, 12)
        return schema
    if kind in ("integer", "number"):
        schema = {"type": kind}
        if rng.random() < 0.5:
            schema["minimum"] = rng.choice([-5, 0, 3, 100, 10**6])
        if rng.random() < 0.5:
            schema["maximum"] = schema.get("minimum", 0) + rng.choice([0, 2, 10, 1000])
        if kind == "number" and rng.random() < 0.3 and "minimum" in schema and schema.get("maximum") != schema["minimum"]:
            schema["exclusiveMinimum"] = schema.pop("minimum")
        if rng.random() < 0.2 and schema.get("maximum", 1) != schema.get("minimum", 0):
            schema["multipleOf"] = rng.choice([1, 2, 0.25, 0.1]) if kind == "number" else rng.choice([1, 2, 5])
            schema.setdefault("maximum", schema.get("minimum", schema.get("exclusiveMinimum", 0)) + 1000)
        return schema
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", 1, 2.5, None, True, "zz"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["k", 3, None, [1, 2], {"a": 1}])}
    if kind == "type_list":
        return {"type": rng.sample(["string", "integer", "null", "boolean", "number"], 2)}
    if kind == "object":
        properties = {f"p{i}": random_schema(rng, depth + 1) for i in range(rng.randint(0, 4))}
        schema = {"type": "object", "properties": properties,
                  "required": [name for name in properties if rng.random() < 0.6]}
        if rng.random() < 0.3:
            schema["additionalProperties"] = False
        if rng.random() < 0.3 and properties:
            schema["propertyOrdering"] = list(reversed(properties))
        if rng.random() < 0.2:
            schema["maxProperties"] = len(schema["required"]) + rng.randint(0, 2)
        return schema
    if kind == "array":
        schema = {"type": "array", "items": random_schema(rng, depth + 1)}
        if rng.random() < 0.4:
            schema["minItems"] = rng.randint(0, 3)
        if rng.random() < 0.4:
            schema["maxItems"] = schema.get("minItems", 0) + rng.randint(0, 3)
        return schema
    if kind == "any_of":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == "all_of":
        return {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                          {"properties": {"b": random_schema(rng, depth + 1)}, "required": ["b"]}]}
    return {"$ref": "#/$defs/Shared"}


def test_random_schemas_validate(responder):
    import random

    rng = random.Random(20240501)
    shared = {"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
              "required": ["id"]}
    for i in range(400):
        schema = {"type": "object", "properties": {"root": random_schema(rng)}, "required": ["root"],
                  "$defs": {"Shared": shared}}
        data = json.loads(generate_json(responder, schema, prompt=f"case {i}")[1])
        validator_for(schema).validate(data)


def test_prompt_tokens_are_detailed_by_modality(responder):
    """usageMetadata.promptTokensDetails, as in every real capture: the prompt's tokens by modality."""
    body = {"contents": [{"role": "user", "parts": [
        {"text": "What is in this picture and this file?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "files/abc123"}},
    ]}]}
    usage = responder.generate(body, MODEL)["usageMetadata"]
    details = {entry["modality"]: entry["tokenCount"] for entry in usage["promptTokensDetails"]}
    assert details == {"TEXT": 10, "IMAGE": 258, "DOCUMENT": 258}
    assert sum(details.values()) == usage["promptTokenCount"]
    text_only = responder.generate(request("Hello there"), MODEL)["usageMetadata"]
    assert text_only["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": text_only["promptTokenCount"]}]


@pytest.mark.parametrize("model, config, thoughts", [
    ("gemini-2.5-flash", None, "some"),                                    # thinks by default (dynamic)
    ("gemini-2.5-flash", {"thinkingBudget": 0}, "none"),                   # turned off
    ("gemini-2.5-flash", {"thinkingBudget": 5}, 5),                        # capped by the budget
    ("gemini-2.5-flash", {"thinkingBudget": -1}, "some"),                  # dynamic
    ("gemini-3-pro-preview", {"thinkingLevel": "high"}, "more"),           # Gemini 3's levels
    ("gemini-3-pro-preview", {"thinkingLevel": "minimal"}, "none"),
    ("gemini-2.0-flash", None, "none"),                                    # does not think
    ("gemini-2.5-flash-lite", None, "none"),
])
def test_thinking_models_report_thought_tokens(responder, model, config, thoughts):
    body = request("Plan a three-day trip to Lisbon with a budget.")
    if config is not None:
        body["generationConfig"] = {"thinkingConfig": config}
    usage = responder.generate(body, model)["usageMetadata"]
    dynamic = responder.generate(request("Plan a three-day trip to Lisbon with a budget."),
                                 "gemini-2.5-flash")["usageMetadata"]["thoughtsTokenCount"]
    spent = usage.get("thoughtsTokenCount", 0)
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"] + spent
    if thoughts == "none":
        assert "thoughtsTokenCount" not in usage
    elif thoughts == "some":
        assert spent == dynamic > 0
    elif thoughts == "more":
        assert spent == 2 * dynamic
    else:
        assert spent == thoughts


def test_include_thoughts_puts_a_thought_summary_first(responder):
    body = request("Why is the sky blue?")
    body["generationConfig"] = {"thinkingConfig": {"includeThoughts": True}}
    parts = responder.generate(body, MODEL)["candidates"][0]["content"]["parts"]
    assert parts[0]["thought"] is True and "thought summary" in parts[0]["text"]
    assert "thought" not in parts[1] and parts[1]["text"].startswith(f"[emulated {MODEL}]")
