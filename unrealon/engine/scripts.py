"""
The Redis engine's server-side scripts.

Everything that must happen together happens in one script, so it happens
entirely or not at all and no other client sees a half-done state: publishing
(history + the room's channel + idempotency key), recovering (epoch + retention
check + replay, one snapshot), and presence changes (membership + counts +
the joined/left notification on the room's channel).  Scripts only touch keys they are
given; argument layouts are documented above each.

Cursor format: C{<epoch>:<history stream id>}.  The epoch is a fresh random
token whenever a room's history is created, so a cursor from a history that
expired or was lost (a Redis restart without persistence) is never mistaken
for a position in the new one.
"""

from __future__ import annotations

from unrealon.engine.redisclient import LuaScript

EPOCH_LIB = """
local function new_epoch()
  local t = redis.call('TIME')
  local n = redis.call('INCR', 'unrealon:epochs')
  return string.format('%x%x%x', tonumber(t[1]), tonumber(t[2]), n)
end
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
-- a room's epoch, made (with an empty history) if it has none, so that its
-- "start" cursor, <epoch>:0-0, is valid from now on
local function room_epoch(history, epoch_key, ttl)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = new_epoch()
    redis.call('DEL', history)
    redis.call('SET', epoch_key, epoch, 'EX', ttl)
  end
  return epoch
end
local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
"""

#: Lua helpers for the rooms' channels (see L{unrealon.engine.roomchannels}):
#: an event goes out with the history id it follows, which is how a node
#: sees that it missed one
ROOM_CHANNEL_LIB = """
-- the history's last entry, before the one being added ('0-0' for none):
-- markers of streamed messages are deleted only when a newer one is the
-- last entry, and trimming takes the oldest, so this is the entry the
-- room's previous event was published with
local function last_entry(history)
  local e = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)
  if #e > 0 then return e[1][1] end
  return '0-0'
end
-- channel message "e" = previous history id, cursor, notification (newline-separated)
local function announce_event(channel, previous, cursor, message)
  redis.call('PUBLISH', channel, 'e' .. previous .. '\\n' .. cursor .. '\\n' .. message)
end
"""

#: Lua helpers for streamed messages (see L{unrealon.engine.messagescripts}),
#: shared by its CHUNK and by RECOVER
MESSAGES_LIB = """
local function fmt(n)
  return string.format('%d', n)
end
-- gaps are kept as "a-b,c-d"; the ones meeting first..last as JSON, clipped
local function gaps_json(gaps, first, last)
  if not gaps or gaps == '' then return '' end
  local out = {}
  for a, b in string.gmatch(gaps, '(%d+)-(%d+)') do
    a, b = tonumber(a), tonumber(b)
    if b >= first and a <= last then
      out[#out + 1] = '[' .. fmt(math.max(a, first)) .. ',' .. fmt(math.min(b, last)) .. ']'
    end
  end
  if #out == 0 then return '' end
  return ',"gaps":[' .. table.concat(out, ',') .. ']'
end
-- the notification of one event of a message; head ends with '"cursor":"',
-- meta is the data object's other fields without its closing brace
local function message_event(head, meta, cursor, content, first, last, done, err, gaps)
  local sep = ','
  if meta == '{' then sep = '' end
  local s = head .. cursor .. '","data":' .. meta .. sep .. '"content":' .. cjson.encode(content)
    .. ',"seq":' .. fmt(first) .. ',"last_seq":' .. fmt(last)
    .. ',"done":' .. (done and 'true' or 'false') .. gaps
  if err then s = s .. ',"error":' .. cjson.encode(err) end
  return s .. '}}}'
end
-- one event of message `mid` covering its deliveries after history id
-- `after` ('' for all of it; all of it too once the message is done); nil
-- when the message's keys are gone, false when it has no event yet (its
-- only chunks are held)
local function compacted(prefix, tag, mid, epoch, after)
  local state = redis.call('HMGET', prefix .. 's:' .. tag .. mid,
                           'next', 'marker', 'head', 'meta', 'done', 'error', 'gaps')
  if not state[1] then return nil end
  if not state[2] then return false end
  local first, offset = 0, 0
  -- a finished message is recovered whole, whatever the client had of it
  if after ~= '' and state[5] ~= '1' then
    local e = redis.call('XRANGE', prefix .. 'i:' .. tag .. mid, '(' .. after, '+', 'COUNT', 1)
    if #e == 0 then return nil end
    local f = e[1][2]
    for j = 1, #f, 2 do
      if f[j] == 's' then first = tonumber(f[j + 1]) end
      if f[j] == 'o' then offset = tonumber(f[j + 1]) end
    end
  end
  local last = tonumber(state[1]) - 1
  local content = redis.call('GETRANGE', prefix .. 't:' .. tag .. mid, offset, -1)
  return message_event(state[3], state[4], epoch .. ':' .. state[2], content, first, last,
                       state[5] == '1', state[6] or nil, gaps_json(state[7], first, last))
end
"""

#: KEYS: history stream, epoch key, idempotency key ("" for none)
#: ARGV: head, tail, history size, history ttl (s), the room's channel, idempotency ttl (s)
#: The notification is head .. cursor .. tail; the server encoded head and tail.
#: Returns the cursor (the first one when the idempotency key was already used).
PUBLISH = LuaScript(
    EPOCH_LIB
    + ROOM_CHANNEL_LIB
    + """
if KEYS[3] ~= '' then
  local done = redis.call('GET', KEYS[3])
  if done then return done end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = new_epoch()
  redis.call('DEL', KEYS[1])
end
local previous = last_entry(KEYS[1])
-- keep at least size + 1 entries (trimming is approximate, from the head):
-- the entry at a cursor with at most `size` events after it is then still
-- there, which is what lets RECOVER prove a replay complete by counting
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[3]) + 1, '*',
                      'h', ARGV[1], 't', ARGV[2])
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], epoch, 'EX', ttl)
local cursor = epoch .. ':' .. id
announce_event(ARGV[5], previous, cursor, ARGV[1] .. cursor .. ARGV[2])
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], cursor, 'EX', tonumber(ARGV[6]))
end
return cursor
"""
)

#: KEYS: history stream, epoch key
#: ARGV: history ttl (s)
#: The cursor of the room's latest event (its "start" when it has none; a
#: room with no history gets an epoch, as in RECOVER).  Its id is what the
#: room's next event will name as the one it follows.
POSITION = LuaScript(
    EPOCH_LIB
    + ROOM_CHANNEL_LIB
    + """
local epoch = room_epoch(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return epoch .. ':' .. last_entry(KEYS[1])
"""
)

#: KEYS: per room: history stream, epoch key, the room's streaming set
#: ARGV: history size, history ttl (s), message key prefix, then per room:
#:       since epoch ("" for none), since id, the room's message tag
#:       (rediskeys.message_tag)
#: Returns, per room, {epoch, last id, recovered (0/1), {message, ...},
#: {streaming, ...}}: the recoveries of one reactor turn's joins (a reconnect
#: storm's) in one call, each its own snapshot.
#: A room with no history gets an epoch (so its "start" cursor, <epoch>:0-0,
#: stays valid).  A streamed message's history entry is a marker ("m" = its
#: id) replayed as one event covering what came after `since`; the messages
#: still streaming are listed unless the replay is complete.
RECOVER = LuaScript(
    EPOCH_LIB
    + MESSAGES_LIB
    + """
local function recover(history, epoch_key, streaming_key, since_epoch, since, size, ttl,
                       prefix, tag)
  local epoch = room_epoch(history, epoch_key, ttl)
  local last = '0-0'
  if redis.call('EXISTS', history) == 1 then
    local info = redis.call('XINFO', 'STREAM', history)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
  end
  local function streaming()
    local out = {}
    for _, mid in ipairs(redis.call('SMEMBERS', streaming_key)) do
      local event = compacted(prefix, tag, mid, epoch, '')
      if event then
        out[#out + 1] = event
      elseif event == nil then
        redis.call('SREM', streaming_key, mid)
      end
    end
    return out
  end
  if since_epoch == '' or since_epoch ~= epoch then
    return {epoch, last, 0, {}, streaming()}
  end
  if id_less(last, since) then
    return {epoch, last, 0, {}, streaming()}
  end
  -- Complete or nothing: PUBLISH keeps at least size + 1 entries and trims
  -- only from the head, so if any entry after `since` was trimmed, every
  -- retained one (size + 1 or more) is after `since` and the count below is
  -- over `size`.  (Entries are deleted otherwise only when a streamed message
  -- moves its marker to its latest event: nothing a replay needs.)
  local entries = redis.call('XRANGE', history, '(' .. since, '+', 'COUNT', size + 1)
  if #entries > size then
    return {epoch, last, 0, {}, streaming()}
  end
  local missed = {}
  for i, entry in ipairs(entries) do
    local fields = entry[2]
    if fields[1] == 'm' then
      local event = compacted(prefix, tag, fields[2], epoch, since)
      -- the message's text is gone (expired): the replay cannot be complete
      if not event then return {epoch, last, 0, {}, streaming()} end
      missed[i] = event
    else
      local head, tail = '', ''
      for j = 1, #fields, 2 do
        if fields[j] == 'h' then head = fields[j + 1] end
        if fields[j] == 't' then tail = fields[j + 1] end
      end
      missed[i] = head .. epoch .. ':' .. entry[1] .. tail
    end
  end
  return {epoch, last, 1, missed, {}}
end
local size, ttl, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local out = {}
for r = 1, #KEYS / 3 do
  local k, a = 3 * r - 2, 3 * r + 1
  out[r] = recover(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a], ARGV[a + 1], size, ttl,
                   prefix, ARGV[a + 2])
end
return out
"""
)


#: KEYS: feed stream
#: ARGV: feed maxlen, then field/value pairs
#: Appends a non-history message (ephemeral presence event, disconnect order).
FEED = LuaScript(
    """
local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call(unpack(args))
"""
)

#: KEYS: feed epoch key
#: ARGV: a fresh token
#: The feed's epoch: set once, kept for ever (no TTL).  A node remembers it;
#: finding another one after an outage means Redis lost its data (a restart
#: without persistence), so entries the node had not read yet are gone even
#: if the feed's ids look continuous.
FEED_EPOCH = LuaScript(
    """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
"""
)

_PRESENCE = """
local function clock()
  -- now in ms, as a number and as an exact decimal string (cjson would write
  -- a big number with an exponent; the string is spliced into the JSON as is)
  local t = redis.call('TIME')
  local ms = math.floor(tonumber(t[2]) / 1000)
  return tonumber(t[1]) * 1000 + ms, t[1] .. string.format('%03d', ms)
end
local function now_ms()
  return (clock())
end
-- a member is "<user>|<conn>@<node token>": user ids may contain "|" (e.g.
-- "auth0|123"), connection ids and tokens never do, so the user is
-- everything before the last bar
local function user_of(member)
  return string.match(member, '^(.*)|')
end
-- the connection as section 9.1 names it: "<conn>@<node token>" (connection
-- ids repeat across a node's restarts; the token does not)
local function conn_of(member)
  return string.match(member, '|([^|]*)$') or ''
end
local function token_of(member)
  return string.match(member, '@([^|@]*)$') or ''
end
-- channel message "p" = excluded user, notification (newline-separated),
-- on the room's channel: the channel prefix and the room make its name
local function announce(channels, room, message, user)
  if message ~= '' then
    redis.call('PUBLISH', channels .. '{' .. room .. '}', 'p' .. user .. '\\n' .. message)
  end
end
-- lifecycle events (PROTOCOL.md section 9.1), appended by the script that
-- makes the transition: that is what makes each one exactly once
local ONLINE = '__online__'
local function tracked(room)
  return string.sub(room, 1, 2) ~= '__'
end
local function emit(stream, maxlen, time, fields)
  local body = cjson.encode(fields)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'payload',
             '{"time":' .. time .. ',' .. string.sub(body, 2))
end
"""

#: KEYS: events stream, this node's token key
#: ARGV: key prefix, lifetime (ms), channel prefix, events maxlen, node id,
#:       connection events ("1" or "0"), token key ttl (s), then per change
#:       7 values: "j" (join) or "l" (leave), room, user, member
#:       (user|conn@token), info json (joins), the joined / left message
#:       ("" for none), connection id as section 9.1 names it (conn@token)
#: The presence changes of this node's connections in one reactor turn, in
#: the order they were made (a leave after its join, never before).
#: A join adds a connection; the user's first announces presence.joined.  A
#: leave removes one; the user's last announces presence.left.  Expiry
#: times come from Redis' clock, so nodes' clocks need not agree.
#: Lifecycle events: in __online__, user.online / user.offline on the
#: user's first / last connection (and connection.opened / .closed if
#: asked); in a tracked room, room.occupied when it had no user and
#: room.vacated when its last user is gone (reason "closed").  Joining
#: __online__ also records the node id under the node's token, for the
#: sweep of a node that died.  Returns how many changes took effect.
PRESENCE_CHANGES = LuaScript(
    _PRESENCE
    + """
local prefix, channels, events, events_maxlen, node = ARGV[1], ARGV[3], KEYS[1], ARGV[4], ARGV[5]
local connection_events = ARGV[6] == '1'
local now, time = clock()
local expires = now + tonumber(ARGV[2])
local changed = 0
for i = 8, #ARGV, 7 do
  local kind, room, user, member = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local message, label = ARGV[i + 5], ARGV[i + 6]
  local zkey, ukey, ikey = prefix .. room .. ':m', prefix .. room .. ':u', prefix .. room .. ':i'
  if kind == 'j' then
    if redis.call('ZADD', zkey, expires, member) == 1 then
      changed = changed + 1
      redis.call('SADD', prefix .. 'rooms', room)
      redis.call('HSET', ikey, user, ARGV[i + 4])
      local first = redis.call('HINCRBY', ukey, user, 1) == 1
      if first then announce(channels, room, message, user) end
      if room == ONLINE then
        redis.call('SET', KEYS[2], node, 'EX', tonumber(ARGV[7]))
        if first then
          emit(events, events_maxlen, time, {type = 'user.online', user_id = user, node_id = node})
        end
        if connection_events then
          emit(events, events_maxlen, time, {type = 'connection.opened', user_id = user,
               connection_id = node .. '/' .. label, node_id = node})
        end
      elseif first and tracked(room) and redis.call('HLEN', ukey) == 1 then
        emit(events, events_maxlen, time, {type = 'room.occupied', room = room, user_id = user,
             node_id = node})
      end
    end
  elseif redis.call('ZREM', zkey, member) == 1 then
    changed = changed + 1
    local last = redis.call('HINCRBY', ukey, user, -1) <= 0
    if last then
      redis.call('HDEL', ukey, user)
      redis.call('HDEL', ikey, user)
      announce(channels, room, message, user)
    end
    if room == ONLINE then
      if connection_events then
        emit(events, events_maxlen, time, {type = 'connection.closed', user_id = user,
             connection_id = node .. '/' .. label, node_id = node, reason = 'closed'})
      end
      if last then
        emit(events, events_maxlen, time, {type = 'user.offline', user_id = user, node_id = node,
             reason = 'closed'})
      end
    elseif last and tracked(room) and redis.call('HLEN', ukey) == 0 then
      emit(events, events_maxlen, time, {type = 'room.vacated', room = room, user_id = user,
           node_id = node, reason = 'closed'})
    end
  end
end
return changed
"""
)

#: KEYS: events stream, this node's token key
#: ARGV: key prefix, lifetime (ms), channel prefix, events maxlen, node id,
#:       connection events ("1" or "0"), token key ttl (s), then
#:       room/member/info-json triples
#: Pushes the expiry of this node's live connections.  A connection that is
#: missing (swept while this node could not heartbeat -- a Redis outage, a
#: long pause -- or lost by a Redis restart) is put back, with its user's
#: count and info, and a user who so comes back is announced again
#: (presence.joined), so a live connection never stays invisible.  Its
#: lifecycle events come again too (user.online, connection.opened,
#: room.occupied): the sweep that removed it sent the offline ones.  Returns
#: how many connections were put back.
PRESENCE_HEARTBEAT = LuaScript(
    _PRESENCE
    + """
local prefix, restored = ARGV[1], 0
local now, time = clock()
local expires = now + tonumber(ARGV[2])
local node, events, events_maxlen = ARGV[5], KEYS[1], ARGV[4]
redis.call('SET', KEYS[2], node, 'EX', tonumber(ARGV[7]))
for i = 8, #ARGV, 3 do
  local room, member, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local zkey = prefix .. room .. ':m'
  if redis.call('ZSCORE', zkey, member) then
    redis.call('ZADD', zkey, 'XX', expires, member)
  else
    restored = restored + 1
    local user = user_of(member)
    local ukey = prefix .. room .. ':u'
    redis.call('ZADD', zkey, expires, member)
    redis.call('SADD', prefix .. 'rooms', room)
    redis.call('HSET', prefix .. room .. ':i', user, info)
    local first = redis.call('HINCRBY', ukey, user, 1) == 1
    if first and tracked(room) then
      local message = '{"jsonrpc":"2.0","method":"presence.joined","params":{"room":'
        .. cjson.encode(room) .. ',"user_id":' .. cjson.encode(user) .. ',"info":' .. info .. '}}'
      announce(ARGV[3], room, message, user)
    end
    if room == ONLINE then
      if first then
        emit(events, events_maxlen, time, {type = 'user.online', user_id = user, node_id = node})
      end
      if ARGV[6] == '1' then
        emit(events, events_maxlen, time, {type = 'connection.opened', user_id = user,
             connection_id = node .. '/' .. conn_of(member), node_id = node})
      end
    elseif first and tracked(room) and redis.call('HLEN', ukey) == 1 then
      emit(events, events_maxlen, time, {type = 'room.occupied', room = room, user_id = user,
           node_id = node})
    end
  end
end
return restored
"""
)

#: KEYS: sweeper lock, last sweep time, events stream
#: ARGV: key prefix, entry lifetime (ms), lock token, lock ttl (ms), channel
#:       prefix, "" (unused), stall (ms), events maxlen, connection events ("1"/"0")
#: The cluster's one expiry sweep: only the lock holder sweeps.  Removes
#: expired connections of every room and announces presence.left for users
#: with none left.  The left notification is built here (JSON-escaped by
#: cjson) because the node that wrote the entry is gone; so are the
#: lifecycle events (reason "node_lost": connection.closed if asked,
#: user.offline, room.vacated), with the node id that node recorded under
#: its token (the token itself if that record is gone).
#: When no sweep ran for longer than `stall` (Redis was away or hung, or the
#: whole cluster was), entries expired because no node could heartbeat, not
#: because their nodes died: instead of announcing everyone left (and joined
#: again at the next heartbeat) it gives the expired entries one more lifetime.
#: Returns {removed, extended}.
PRESENCE_SWEEP = LuaScript(
    _PRESENCE
    + """
local prefix = ARGV[1]
local now, time = clock()
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[3] then return {-1, 0} end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], now)
local grace = last > 0 and now - last > tonumber(ARGV[7])
local rooms = redis.call('SMEMBERS', prefix .. 'rooms')
local removed, extended = 0, 0
local events, events_maxlen, connection_events = KEYS[3], ARGV[8], ARGV[9] == '1'
local nodes = {}
local function node_of(member)
  local token = token_of(member)
  local node = nodes[token]
  if not node then
    node = redis.call('GET', prefix .. 'node:' .. token) or token
    nodes[token] = node
  end
  return node
end
for _, room in ipairs(rooms) do
  local zkey = prefix .. room .. ':m'
  local ukey = prefix .. room .. ':u'
  local ikey = prefix .. room .. ':i'
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  if grace then
    for _, member in ipairs(expired) do
      redis.call('ZADD', zkey, 'XX', now + tonumber(ARGV[2]), member)
      extended = extended + 1
    end
    expired = {}
  end
  for _, member in ipairs(expired) do
    redis.call('ZREM', zkey, member)
    removed = removed + 1
    local user = user_of(member)
    local gone = redis.call('HINCRBY', ukey, user, -1) <= 0
    if gone then
      redis.call('HDEL', ukey, user)
      redis.call('HDEL', ikey, user)
      if tracked(room) then
        local message = cjson.encode({jsonrpc = '2.0', method = 'presence.left',
                                      params = {room = room, user_id = user}})
        announce(ARGV[5], room, message, user)
      end
    end
    if room == ONLINE then
      if connection_events then
        local node = node_of(member)
        emit(events, events_maxlen, time, {type = 'connection.closed', user_id = user,
             connection_id = node .. '/' .. conn_of(member), node_id = node,
             reason = 'node_lost'})
      end
      if gone then
        emit(events, events_maxlen, time, {type = 'user.offline', user_id = user,
             node_id = node_of(member), reason = 'node_lost'})
      end
    elseif gone and tracked(room) and redis.call('HLEN', ukey) == 0 then
      emit(events, events_maxlen, time, {type = 'room.vacated', room = room, user_id = user,
           node_id = node_of(member), reason = 'node_lost'})
    end
  end
  if redis.call('ZCARD', zkey) == 0 then
    redis.call('DEL', zkey, ukey, ikey)
    redis.call('SREM', prefix .. 'rooms', room)
  end
end
return {removed, extended}
"""
)

#: KEYS: members zset, info hash
#: ARGV: none
#: Live connections of a room: {member, info-json-or-false, ...} (Redis' clock).
PRESENCE_LIST = LuaScript(
    _PRESENCE
    + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
local out = {}
for _, member in ipairs(members) do
  local user = user_of(member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], user) or ''
end
return out
"""
)


# -- the HTTP API's Idempotency-Key records (unrealon.engine.redisreplies) ------

#: KEYS: record.  ARGV: pending value, pending ttl (s).
#: "" when this request claimed the key, else the record as it stands.
API_CLAIM = LuaScript(
    """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return '' end
return redis.call('GET', KEYS[1]) or ''
"""
)

#: KEYS: record.  ARGV: pending value, done value, reply ttl (s).
#: Stores the reply unless another request holds the key now.
API_FINISH = LuaScript(
    """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""
)

#: KEYS: record.  ARGV: pending value.  Frees the key if this request still holds it.
API_RELEASE = LuaScript(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)
