"""
The twistd plugin: `twistd -n unrealon-ws` and `twist unrealon-ws`.

Kept import-light on purpose: plugin discovery imports this file before the
runner installs its reactor, so it names the options module without
importing anything heavy.
"""

from twisted.application.service import ServiceMaker

unrealon_ws = ServiceMaker(
    "unrealon-ws",
    "unrealon.tap",
    "Real-time WebSocket JSON-RPC server (rooms, presence, history, Redis Streams ingress)",
    "unrealon-ws",
)
