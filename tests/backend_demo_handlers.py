"""
Backend methods for the client end-to-end tests (PROTOCOL.md section 9),
served by ``python -m unrealon_backend worker --handlers tests.backend_demo_handlers``.

``demo.count`` is the example's method (examples/backend_methods.py), with
one addition: what the worker saw of each call -- started, cancelled (and
why), finished -- is appended as one JSON line to the file named by
``UNREALON_TEST_BACKEND_LOG``, so a test can check that a client's cancel
reached the worker, not only that the client stopped waiting.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from typing import Any

from unrealon_backend import method

from examples.backend_methods import count as example_count

_LOG = os.environ.get("UNREALON_TEST_BACKEND_LOG", "")
#: the example's declaration, served under another name here so both can be loaded
_DECLARED = {
    "params": {
        "type": "object",
        "properties": {"to": {"type": "integer", "minimum": 1, "maximum": 1000},
                       "delay": {"type": "number", "minimum": 0, "maximum": 5}},
        "required": ["to"],
        "additionalProperties": False,
    },
    "result": {"type": "object", "properties": {"counted": {"type": "integer"}},
               "required": ["counted"], "additionalProperties": False},
    "progress": {"type": "object", "properties": {"n": {"type": "integer"}},
                 "required": ["n"], "additionalProperties": False},
}


def note(**entry: Any) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


@method("demo.logged_count", timeout=30, **_DECLARED)
def logged_count(call: Any, to: int, delay: float = 0.2) -> Generator[dict[str, int], None, dict[str, int]]:
    note(event="started", call_id=call.call_id, to=to)
    n = 0
    try:
        for n in range(1, to + 1):
            yield {"n": n}
            time.sleep(delay)
    except BaseException as e:  # Cancelled, thrown in at the yield: note it and let it end the call
        note(event="cancelled", call_id=call.call_id, at=n, reason=call.cancel_reason,
             error=type(e).__name__)
        raise
    note(event="finished", call_id=call.call_id, counted=to)
    return {"counted": to}


__all__ = ["example_count", "logged_count"]
