"""
The example's backend method, served by a worker:

    python -m unrealon_backend worker --redis redis://127.0.0.1:6379/0 \\
        --handlers examples.backend_methods

(from the repository's root, so ``examples`` imports).  ``demo.count`` counts
to ``to``, one progress item ``{"n": n}`` every ``delay`` seconds, and returns
``{"counted": to}``: the browser example (examples/browser) shows the items
as a progress bar and cancels it with an AbortSignal.  Generate typed client
calls for it from the declarations:

    python -m unrealon_backend declarations --handlers examples.backend_methods > decls.json
    python -m unrealon.codegen --root <your copy> --backend-methods decls.json
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from unrealon_backend import method


@method(
    "demo.count",
    description="Count to `to`, one progress item per number, `delay` seconds apart.",
    params={
        "type": "object",
        "properties": {
            "to": {"type": "integer", "minimum": 1, "maximum": 1000},
            "delay": {"type": "number", "minimum": 0, "maximum": 5},
        },
        "required": ["to"],
        "additionalProperties": False,
    },
    result={
        "type": "object",
        "properties": {"counted": {"type": "integer"}},
        "required": ["counted"],
        "additionalProperties": False,
    },
    progress={
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    },
    timeout=60,
    idempotent=False,
)
def count(call: Any, to: int, delay: float = 0.2) -> Generator[dict[str, int], None, dict[str, int]]:
    # A sync generator runs on a thread of its own, so sleeping is fine.  Each
    # yield is one rpc.progress; a cancel (the browser's Cancel, its tab
    # closing, the deadline) is raised at the next yield, which ends the loop.
    for n in range(1, to + 1):
        yield {"n": n}
        if call.cancelled:  # no need to sleep once nobody is waiting
            break
        time.sleep(delay)
    return {"counted": to}
