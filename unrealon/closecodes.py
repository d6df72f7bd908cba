"""The WebSocket close codes of PROTOCOL.md section 3, by name."""

NORMAL = 1000
#: server going away (clients reconnect, elsewhere if they can)
GOING_AWAY = 1001
#: a binary message
UNSUPPORTED = 1003
UNAUTHENTICATED = 4001
#: connections.disconnect from the backend
DISCONNECTED = 4003
SLOW_CONSUMER = 4008
TOKEN_EXPIRED = 4009
RATE_ABUSE = 4029
TOO_MANY_CONNECTIONS = 4030
