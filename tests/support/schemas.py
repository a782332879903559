"""JSON Schemas that more than one test file asks the server to hold a reply to."""

from __future__ import annotations


def formatted(**formats: str) -> dict:
    """An object whose properties are strings of the given formats (day="date"), every one of them required."""
    return {
        "type": "object",
        "properties": {name: {"type": "string", "format": fmt} for name, fmt in formats.items()},
        "required": list(formats),
    }
