"""
The handler bench/backend_rpc.py measures, served two ways: as a backend
method (``python -m unrealon_backend worker --handlers backend_handlers``)
and as a Django view (bench/django_echo.py).  Both run the same function.
"""

from __future__ import annotations

from typing import Any

from unrealon_backend import method

PARAMS = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 4096}},
    "required": ["text"],
    "additionalProperties": False,
}
RESULT = {
    "type": "object",
    "properties": {"echo": {"type": "string"}, "length": {"type": "integer"}},
    "required": ["echo", "length"],
}


def echo_result(text: str) -> dict[str, Any]:
    """What both servers answer: the work of a small Django service function."""
    return {"echo": text, "length": len(text)}


@method("bench.echo", params=PARAMS, result=RESULT, timeout=30)
def echo(call: Any, text: str) -> dict[str, Any]:
    return echo_result(text)
