"""The values of google-genai's enums that a manifest may name: thinking levels, media resolutions,
response modalities, harm categories and block thresholds.

Importing google-genai's types takes about a second, which every manifest check would pay; so the
values are read from the SDK once, by ``python -m batchd.reference``, into ``sdk_enums.json`` beside
this module (a test fails when the file no longer matches the installed SDK). The ``*_UNSPECIFIED``
members are left out: they mean "not set", which leaving a setting out already says.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

ENUMS_FILE = Path(__file__).with_name("sdk_enums.json")
#: The enums read, by their names in ``google.genai.types``.
ENUM_NAMES = ("HarmBlockThreshold", "HarmCategory", "MediaResolution", "Modality", "ThinkingLevel")


def read_sdk_enums() -> dict[str, list[str]]:
    """Each enum's wire values, in the SDK's order, from the installed google-genai."""
    from google.genai import types

    return {name: [member.value for member in getattr(types, name) if not member.value.endswith("_UNSPECIFIED")]
            for name in ENUM_NAMES}


def dump(enums: dict[str, list[str]]) -> str:
    """``enums`` as the text of sdk_enums.json."""
    return json.dumps(enums, indent=1, sort_keys=True) + "\n"


@lru_cache(maxsize=1)
def _enums() -> dict[str, list[str]]:
    return json.loads(ENUMS_FILE.read_text(encoding="utf-8"))


def values(name: str) -> tuple[str, ...]:
    """The wire values of the enum ``name`` (one of :data:`ENUM_NAMES`)."""
    return tuple(_enums()[name])
