"""
A recovery's events as JSON values, for the tests that look into them.

The Redis engine hands a join's replayed events over as the text Redis
stored (L{jsoncodec.RawJSON}), which a reply copies as it is; the memory
engine hands over values.  L{as_values} gives both as values, and checks on
the way what copying relies on: each text is exactly the codec's encoding of
the value it holds, so a reply holding the text is byte for byte the reply
that held the value.
"""

from __future__ import annotations

from typing import Any

import attrs

from unrealon import jsoncodec
from unrealon.engine.interfaces import Recovery


def value_of(event: Any) -> Any:
    """C{event}'s JSON value; for a L{jsoncodec.RawJSON}, after checking its text."""
    if not isinstance(event, jsoncodec.RawJSON):
        return event
    value = jsoncodec.reference_decode(event.text)
    encoded = jsoncodec.reference_text(value)
    if encoded != event.text:
        raise AssertionError(
            f"a stored event is not the codec's encoding of its value:\n"
            f"  stored  {event.text!r}\n  encoded {encoded!r}"
        )
    return value


def as_values(recovery: Recovery) -> Recovery:
    """C{recovery} with its events as JSON values (see L{value_of})."""
    return attrs.evolve(
        recovery,
        missed=tuple(value_of(m) for m in recovery.missed),
        streaming=tuple(value_of(s) for s in recovery.streaming),
    )
