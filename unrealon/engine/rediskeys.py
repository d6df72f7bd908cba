"""
The Redis key layout of the Redis engine: every key the server writes.

One place for the names, so the layout can be read (and changed, e.g.
hash-tagged for a Redis Cluster) without reading every script's caller.
"""

from __future__ import annotations

PREFIX = "unrealon:"
#: the cluster feed of disconnect orders: every node reads it from its own
#: last id (room events and presence go on the rooms' channels instead)
FEED = PREFIX + "feed"
#: changes whenever the feed is lost (Redis came back empty)
FEED_EPOCH = PREFIX + "feed:epoch"
#: entries kept in the feed: minutes of traffic, so a node that loses Redis
#: for a moment finds its position still there
FEED_MAXLEN = 100_000
#: how long an ingress entry's publication is remembered (crash before ack)
IDEMPOTENCY_TTL = 86_400
#: presence keys start with this (a room's are C{<PRESENCE><room>:m|u|i})
PRESENCE = PREFIX + "p:"
#: on each shard of sharded rooms: its place in the node's list ("1 of 3")
SHARD_PLACE = PREFIX + "shard"
#: node token -> when its liveness expires (ms, Redis' clock): refreshed by
#: the node's heartbeat and its presence writes, read by presence.list and
#: the sweep (L{unrealon.engine.redispresence})
PRESENCE_ALIVE = PRESENCE + "alive"
#: the set of rooms with presence that versions before liveness by node kept
#: (their sweep walked it): its presence data is not understood by this one
PRESENCE_ROOMS_BEFORE_LIVENESS = PRESENCE + "rooms"
#: tokens of nodes the sweep found dead and has not finished sweeping
PRESENCE_DEAD = PRESENCE + "dead"
#: the presence sweep's lock and the time of the last sweep
PRESENCE_SWEEP_LOCK = PRESENCE + "sweeper"
PRESENCE_SWEPT = PRESENCE + "swept"


def presence_index_key(token: str) -> str:
    """
    A node's index of its presence entries (C{<room>\\n<member>}), what the
    sweep removes when the node dies.  The sweep script builds the same name
    from L{PRESENCE} and the token (it learns dead tokens inside Redis).
    """
    return f"{PRESENCE}idx:{token}"


def presence_node_key(token: str) -> str:
    """
    The node id a node records under its token (its joins of C{__online__}
    and its heartbeats), for the sweep to name a dead node in its lifecycle
    events.  The sweep script builds the same name.
    """
    return f"{PRESENCE}node:{token}"


def room_channel_prefix(db: int) -> str:
    """
    What a room's Pub/Sub channel name starts with.  Channels ignore Redis'
    database numbers, so the number is in the name: two deployments on one
    Redis, in two databases, do not hear each other's rooms.
    """
    return f"{PREFIX}r:{db}:"


def room_channel(prefix: str, room: str) -> str:
    """
    A room's channel: its events (with their history positions) and its
    presence notifications, for the nodes with members in it.  The room is
    the hash tag, as for its keys, so a cluster's sharded Pub/Sub keeps it
    in the room's slot.
    """
    return f"{prefix}{{{room}}}"


def history_key(room: str) -> str:
    """A room's history stream."""
    return f"{PREFIX}h:{room}"


def epoch_key(room: str) -> str:
    """A room's history epoch (a new one when the history was lost)."""
    return f"{PREFIX}e:{room}"


def idempotency_key(key: str) -> str:
    """What remembers that a publication with this key was made."""
    return f"{PREFIX}idem:{key}"


def api_reply_key(scoped: str) -> str:
    """An HTTP API Idempotency-Key record (L{unrealon.idempotency.scoped_key})."""
    return f"{PREFIX}api:idem:{scoped}"


# -- the backend both ways (PROTOCOL.md section 9): fixed names, workers use them too

#: method name -> declaration JSON, written by workers
BACKEND_METHODS = PREFIX + "backend:methods"
#: worker id -> {"methods": [...], "expires": ms}, written by workers' heartbeats
BACKEND_WORKERS = PREFIX + "backend:workers"
#: Pub/Sub channel of cancelled call ids
BACKEND_CANCEL_CHANNEL = PREFIX + "backend:cancel"


def backend_reply_stream(node_id: str) -> str:
    """Where workers answer the calls of node C{node_id}."""
    return f"{PREFIX}backend:replies:{node_id}"


def backend_cancel_key(call_id: str) -> str:
    """Exists while call C{call_id} is cancelled (a worker must not start it)."""
    return f"{PREFIX}backend:cancel:{call_id}"


# -- streamed messages (PROTOCOL.md section 5.1) ---------------------------------
# A message's keys are "<kind>:{<room>}|<message id>": room names hold neither
# "|" nor braces, so the message id is everything after the first "|" (ids are
# free text), and the hash tag keeps a room's message keys in one slot.

#: kinds of message keys: state hash, text, delivery index stream, held chunks
MESSAGE_KINDS = ("s", "t", "i", "h")
#: message keys start with this
MESSAGE = PREFIX + "m:"
#: zset of "<room>\n<message id>" with held chunks, scored by when they are due
MESSAGES_HELD = PREFIX + "m:held"


def message_tag(room: str) -> str:
    """What follows a message key's kind, before the message id."""
    return f"{{{room}}}|"


def message_keys(room: str, message_id: str) -> list[str]:
    """State, text, index and held-chunks keys of one streamed message."""
    tag = message_tag(room) + message_id
    return [f"{MESSAGE}{kind}:{tag}" for kind in MESSAGE_KINDS]


def streaming_key(room: str) -> str:
    """The set of a room's messages still streaming."""
    return f"{PREFIX}ms:{{{room}}}"
