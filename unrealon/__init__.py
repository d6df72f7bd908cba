"""unrealon-ws: a real-time WebSocket JSON-RPC server on Twisted."""

__version__ = "0.1.0"
