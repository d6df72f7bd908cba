"""
What a room name, a user id and an event name may be (PROTOCOL.md sections 2,
4 and 6), stated once: as the unanchored pattern a JSON Schema carries, and
as the anchored check the server runs.
"""

from __future__ import annotations

import re

#: a room name (PROTOCOL.md section 4)
ROOM_NAME = r"[A-Za-z0-9_.:@-]{1,200}"
#: a user id, the C{sub} claim (PROTOCOL.md section 2)
USER_ID = r"[A-Za-z0-9_.@-]{1,128}"
#: an event name the backend may publish (PROTOCOL.md section 6)
EVENT_NAME = r"[A-Za-z0-9_.:-]{1,100}"
#: a C{rooms} claim pattern that can match a room: room-name characters and C{*}
ROOM_GRANT = r"[A-Za-z0-9_.:@*-]{1,200}"


def _anchored(pattern: str) -> re.Pattern[str]:
    # PROTOCOL.md writes these with "$"; in Python "$" also matches before a
    # trailing newline, so "\Z" is the faithful spelling: "room\n" must not
    # pass, whether callers use match() or fullmatch().
    return re.compile(rf"^{pattern}\Z")


ROOM_NAME_RE = _anchored(ROOM_NAME)
USER_ID_RE = _anchored(USER_ID)
ROOM_GRANT_RE = _anchored(ROOM_GRANT)
