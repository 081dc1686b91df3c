"""A small JSON Schema (draft-07) validator, enough for the keywords `policy schema` emits.

The project has no jsonschema dependency; this covers type, properties, additionalProperties,
required, enum, const, pattern, minLength, minItems, items, minimum, maximum, exclusiveMinimum,
anyOf, oneOf, not, if/then/else. Unknown keywords fail loudly, so the schema cannot grow a
keyword this validator silently ignores.
"""

from __future__ import annotations

import math
import re

KNOWN = {
    "$schema", "title", "description", "default", "type", "properties", "additionalProperties", "required",
    "enum", "const", "pattern", "minLength", "minItems", "items", "minimum", "maximum", "exclusiveMinimum",
    "anyOf", "oneOf", "not", "if", "then", "else",
}


def _is_type(value, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(f"type {name}")


def errors(schema: dict, value, path: str = "") -> list[str]:
    """Every violation, as 'path: reason'; [] when `value` is valid."""
    unknown = set(schema) - KNOWN
    assert not unknown, f"validator does not know {unknown}"
    found: list[str] = []
    if "type" in schema and not _is_type(value, schema["type"]):
        return [f"{path}: not {schema['type']}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: not in {schema['enum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{path}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum")):
                found.append(f"{path}: nan")
        else:
            if "minimum" in schema and value < schema["minimum"]:
                found.append(f"{path}: below minimum")
            if "maximum" in schema and value > schema["maximum"]:
                found.append(f"{path}: above maximum")
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                found.append(f"{path}: not above exclusiveMinimum")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{path}: too few items")
        if "items" in schema:
            for index, item in enumerate(value):
                found += errors(schema["items"], item, f"{path}[{index}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                found += errors(properties[key], item, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}: unknown key {key}")
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{path}: missing {key}")
    if "anyOf" in schema and all(errors(sub, value, path) for sub in schema["anyOf"]):
        found.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema and sum(1 for sub in schema["oneOf"] if not errors(sub, value, path)) != 1:
        found.append(f"{path}: does not match exactly one of oneOf")
    if "not" in schema and not errors(schema["not"], value, path):
        found.append(f"{path}: matches not")
    if "if" in schema:
        branch = "then" if not errors(schema["if"], value, path) else "else"
        if branch in schema:
            found += errors(schema[branch], value, path)
    return found
