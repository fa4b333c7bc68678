"""A JSON Schema check for the tests, of the keywords they use: no jsonschema package here."""

from __future__ import annotations

from typing import Any

__all__ = ["valid"]


def valid(schema: dict[str, Any], value: Any) -> bool:
    """Whether `value` is valid against `schema`: the JSON Schema keywords these tests use."""
    if "anyOf" in schema:
        return any(valid(branch, value) for branch in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kind = schema.get("type")
    if kind in ("integer", "number"):
        if type(value) not in ((int,) if kind == "integer" else (int, float)):
            return False
        return value >= schema.get("minimum", value) and value <= schema.get("maximum", value)
    if kind is not None and not isinstance(value, kinds[kind]):
        return False
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if isinstance(value, list):
        return all(valid(schema.get("items", {}), item) for item in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(name not in value for name in schema.get("required", ())):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(valid(properties[name], item) for name, item in value.items() if name in properties)
    return True
