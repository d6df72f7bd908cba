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
#: {streaming, ...}, {index, ...}}: the recoveries of one reactor turn's joins
#: (a reconnect storm's) in one call, each its own snapshot.  The indexes
#: (from 1) are those of the messages that are streamed messages' events,
#: whose content and error cjson encoded (it writes "/" as "\/"); the other
#: messages are the publish script's head .. cursor .. tail, which the
#: server's codec made.
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
    return {epoch, last, 0, {}, streaming(), {}}
  end
  if id_less(last, since) then
    return {epoch, last, 0, {}, streaming(), {}}
  end
  -- Complete or nothing: PUBLISH keeps at least size + 1 entries and trims
  -- only from the head, so if any entry after `since` was trimmed, every
  -- retained one (size + 1 or more) is after `since` and the count below is
  -- over `size`.  (Entries are deleted otherwise only when a streamed message
  -- moves its marker to its latest event: nothing a replay needs.)
  local entries = redis.call('XRANGE', history, '(' .. since, '+', 'COUNT', size + 1)
  if #entries > size then
    return {epoch, last, 0, {}, streaming(), {}}
  end
  local missed, streamed = {}, {}
  for i, entry in ipairs(entries) do
    local fields = entry[2]
    if fields[1] == 'm' then
      local event = compacted(prefix, tag, fields[2], epoch, since)
      -- the message's text is gone (expired): the replay cannot be complete
      if not event then return {epoch, last, 0, {}, streaming(), {}} end
      missed[i] = event
      streamed[#streamed + 1] = i
    else
      local head, tail = '', ''
      for j = 1, #fields, 2 do
        if fields[j] == 'h' then head = fields[j + 1] end
        if fields[j] == 't' then tail = fields[j + 1] end
      end
      missed[i] = head .. epoch .. ':' .. entry[1] .. tail
    end
  end
  return {epoch, last, 1, missed, {}, streamed}
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
-- a node's index entry for one of its entries: room names never hold a
-- newline (names.ROOM_NAME), so the room is everything before the first
local function index_entry(room, member)
  return room .. '\\n' .. member
end
-- every member of a room's set has score 0: liveness is per node (the
-- alive set), and equal scores let presence.online find a user's members
-- by lexical range
local SCORE = 0
-- whether the nodes of these tokens are live (their record in the alive set
-- has not expired), asked once per token: a room's members come from a few
-- nodes
local function liveness(alive, now)
  local known = {}
  return function(token)
    local live = known[token]
    if live == nil then
      local expires = redis.call('ZSCORE', alive, token)
      live = expires and tonumber(expires) > now or false
      known[token] = live
    end
    return live
  end
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
-- a node's liveness record: pushed to now + lifetime; true when it had none
-- (the node's first write, or the sweep claimed it as dead, or Redis lost
-- its data): whatever the node had may be gone, and it must put it back
local function refresh(alive, token, expires)
  local lost = not redis.call('ZSCORE', alive, token)
  redis.call('ZADD', alive, expires, token)
  return lost
end
-- puts back one entry of a live node (a join, or a restore of one that is
-- missing): the member, the node's index, the user's count and info; the
-- user's first entry is announced (message, "" for none) and the lifecycle
-- events of the transition appended.  False when it was there already.
local function add_entry(prefix, room, user, member, info, message, c)
  local zkey, ukey = prefix .. room .. ':m', prefix .. room .. ':u'
  if redis.call('ZADD', zkey, SCORE, member) == 0 then return false end
  redis.call('SADD', c.index, index_entry(room, member))
  redis.call('HSET', prefix .. room .. ':i', user, info)
  local first = redis.call('HINCRBY', ukey, user, 1) == 1
  if first then announce(c.channels, room, message, user) end
  if room == ONLINE then
    if first then
      emit(c.events, c.maxlen, c.time, {type = 'user.online', user_id = user, node_id = c.node})
    end
    if c.connection_events then
      emit(c.events, c.maxlen, c.time, {type = 'connection.opened', user_id = user,
           connection_id = c.node .. '/' .. conn_of(member), node_id = c.node})
    end
  elseif first and tracked(room) and redis.call('HLEN', ukey) == 1 then
    emit(c.events, c.maxlen, c.time, {type = 'room.occupied', room = room, user_id = user,
         node_id = c.node})
  end
  return true
end
-- removes one entry (a leave, reason "closed", or the sweep of a dead node,
-- "node_lost"): the user's last is announced left (message, "" for none)
-- and the lifecycle events of the transition appended; a room with no
-- member left loses its keys.  False when it was not there.
local function remove_entry(prefix, room, member, message, reason, c)
  local zkey, ukey, ikey = prefix .. room .. ':m', prefix .. room .. ':u', prefix .. room .. ':i'
  if redis.call('ZREM', zkey, member) == 0 then return false end
  redis.call('SREM', c.index, index_entry(room, member))
  local user = user_of(member)
  local last = redis.call('HINCRBY', ukey, user, -1) <= 0
  if last then
    redis.call('HDEL', ukey, user)
    redis.call('HDEL', ikey, user)
    announce(c.channels, room, message, user)
    -- the hashes empty themselves with consistent counts; this is for ones
    -- that are not (data written by hand, a partial restore from disk)
    if redis.call('EXISTS', zkey) == 0 then redis.call('DEL', ukey, ikey) end
  end
  if room == ONLINE then
    if c.connection_events then
      emit(c.events, c.maxlen, c.time, {type = 'connection.closed', user_id = user,
           connection_id = c.node .. '/' .. conn_of(member), node_id = c.node, reason = reason})
    end
    if last then
      emit(c.events, c.maxlen, c.time, {type = 'user.offline', user_id = user,
           node_id = c.node, reason = reason})
    end
  elseif last and tracked(room) and redis.call('HLEN', ukey) == 0 then
    emit(c.events, c.maxlen, c.time, {type = 'room.vacated', room = room, user_id = user,
         node_id = c.node, reason = reason})
  end
  return true
end
"""

#: KEYS: events stream, this node's token key, alive set, this node's index
#: ARGV: key prefix, lifetime (ms), channel prefix, events maxlen, node id,
#:       connection events ("1" or "0"), token key ttl (s), node token, then
#:       per change 6 values: "j" (join) or "l" (leave), room, user, member
#:       (user|conn@token), info json (joins), the joined / left message
#:       ("" for none)
#: The presence changes of this node's connections in one reactor turn, in
#: the order they were made (a leave after its join, never before).
#: A join adds a connection (and its line in the node's index, for the
#: sweep); the user's first announces presence.joined.  A leave removes one;
#: the user's last announces presence.left.
#: Lifecycle events: in __online__, user.online / user.offline on the
#: user's first / last connection (and connection.opened / .closed if
#: asked); in a tracked room, room.occupied when it had no user and
#: room.vacated when its last user is gone (reason "closed").  Joining
#: __online__ also records the node id under the node's token, for the
#: sweep of a node that died.
#: A node that writes is alive: its liveness record is refreshed (Redis'
#: clock).  Returns {changes that took effect, lost}: lost is 1 when the
#: node had no liveness record (its first write, or it was swept, or Redis
#: lost its data), so the node puts back what it has (PRESENCE_RESTORE).
PRESENCE_CHANGES = LuaScript(
    _PRESENCE
    + """
local prefix = ARGV[1]
local now, time = clock()
local lost = refresh(KEYS[3], ARGV[8], now + tonumber(ARGV[2]))
local c = {events = KEYS[1], index = KEYS[4], channels = ARGV[3], maxlen = ARGV[4],
           node = ARGV[5], connection_events = ARGV[6] == '1', time = time}
local changed = 0
for i = 9, #ARGV, 6 do
  local kind, room, user, member = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'j' then
    if add_entry(prefix, room, user, member, ARGV[i + 4], ARGV[i + 5], c) then
      changed = changed + 1
      if room == ONLINE then
        redis.call('SET', KEYS[2], c.node, 'EX', tonumber(ARGV[7]))
      end
    end
  elseif remove_entry(prefix, room, member, ARGV[i + 5], 'closed', c) then
    changed = changed + 1
  end
end
return {changed, lost and 1 or 0}
"""
)

#: KEYS: alive set, this node's token key
#: ARGV: node token, lifetime (ms), node id, token key ttl (s)
#: A node's heartbeat: its liveness record (and the node id under its token)
#: pushed back, whatever number of entries it has.  Returns 1 when the
#: record was missing (the sweep claimed the node while it could not
#: heartbeat -- a Redis outage, a long pause -- or Redis lost its data): the
#: node then puts its entries back with PRESENCE_RESTORE.
PRESENCE_HEARTBEAT = LuaScript(
    _PRESENCE
    + """
local lost = refresh(KEYS[1], ARGV[1], now_ms() + tonumber(ARGV[2]))
redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[4]))
return lost and 1 or 0
"""
)

#: KEYS: events stream, this node's index
#: ARGV: key prefix, channel prefix, events maxlen, node id, connection
#:       events ("1" or "0"), then room/member/info-json triples
#: Puts back the node's connections that are missing (swept while the node
#: could not heartbeat, or lost by a Redis restart), with their users'
#: counts and info, and announces a user who so comes back
#: (presence.joined), so a live connection never stays invisible.  Its
#: lifecycle events come again too (user.online, connection.opened,
#: room.occupied): the sweep that removed it sent the offline ones.  Entries
#: still there are left alone.  Returns how many were put back.
PRESENCE_RESTORE = LuaScript(
    _PRESENCE
    + """
local prefix, restored = ARGV[1], 0
local _, time = clock()
local c = {events = KEYS[1], index = KEYS[2], channels = ARGV[2], maxlen = ARGV[3],
           node = ARGV[4], connection_events = ARGV[5] == '1', time = time}
for i = 6, #ARGV, 3 do
  local room, member, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local user = user_of(member)
  local message = ''
  if tracked(room) then
    message = '{"jsonrpc":"2.0","method":"presence.joined","params":{"room":'
      .. cjson.encode(room) .. ',"user_id":' .. cjson.encode(user) .. ',"info":' .. info .. '}}'
  end
  if add_entry(prefix, room, user, member, info, message, c) then restored = restored + 1 end
end
return restored
"""
)

#: KEYS: sweeper lock, last sweep time, events stream, alive set, dead set
#: ARGV: key prefix, liveness lifetime (ms), lock token, lock ttl (ms),
#:       channel prefix, entries per call, stall (ms), events maxlen,
#:       connection events ("1"/"0")
#: The cluster's one sweep: only the lock holder sweeps.  Nodes whose
#: liveness record expired are claimed as dead (moved from the alive set to
#: the dead set); then the entries of dead nodes are removed from their
#: indexes, at most `entries per call` of them, so one call never holds
#: Redis for long; the caller calls again while the reply says more.  Live
#: nodes' rooms are never read.  A claimed node that writes again (its
#: heartbeat, a join) is back in the alive set: its sweep stops there, and
#: the node puts back what was removed.  The left notification is built
#: here (JSON-escaped by cjson) because the node that wrote the entry is
#: gone; so are the lifecycle events (reason "node_lost": connection.closed
#: if asked, user.offline, room.vacated), with the node id that node
#: recorded under its token (the token itself if that record is gone).
#: When no sweep ran for longer than `stall` (Redis was away or hung, or the
#: whole cluster was), liveness expired because no node could heartbeat, not
#: because nodes died: instead of announcing everyone left (and joined again
#: at the next heartbeat) it gives the expired records one more lifetime.
#: Returns {removed, extended, more} ({-1, 0, 0}: another node holds the lock).
PRESENCE_SWEEP = LuaScript(
    _PRESENCE
    + """
local prefix, alive, dead = ARGV[1], KEYS[4], KEYS[5]
local now, time = clock()
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[3] then return {-1, 0, 0} end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], now)
-- nodes are few (tens): their records are read whole
local expired = redis.call('ZRANGEBYSCORE', alive, '-inf', now)
if last > 0 and now - last > tonumber(ARGV[7]) then
  for _, token in ipairs(expired) do
    redis.call('ZADD', alive, now + tonumber(ARGV[2]), token)
  end
  return {0, #expired, 0}
end
for _, token in ipairs(expired) do
  redis.call('ZREM', alive, token)
  redis.call('SADD', dead, token)
end
local budget, removed = tonumber(ARGV[6]), 0
for _, token in ipairs(redis.call('SMEMBERS', dead)) do
  if budget <= 0 then break end
  local index = prefix .. 'idx:' .. token
  if redis.call('ZSCORE', alive, token) then
    -- back (it wrote after it was claimed): what is left of its entries is
    -- its own again, and it restores the rest itself
    redis.call('SREM', dead, token)
  else
    local c = {events = KEYS[3], index = index, channels = ARGV[5], maxlen = ARGV[8],
               node = redis.call('GET', prefix .. 'node:' .. token) or token,
               connection_events = ARGV[9] == '1', time = time}
    local lines = redis.call('SRANDMEMBER', index, budget)
    budget = budget - #lines
    for _, line in ipairs(lines) do
      local room, member = string.match(line, '^([^\\n]*)\\n(.*)$')
      local message = cjson.encode({jsonrpc = '2.0', method = 'presence.left',
                                    params = {room = room, user_id = user_of(member)}})
      if not tracked(room) then message = '' end
      if remove_entry(prefix, room, member, message, 'node_lost', c) then
        removed = removed + 1
      else
        redis.call('SREM', index, line)  -- a line whose entry is gone already
      end
    end
    if redis.call('EXISTS', index) == 0 then redis.call('SREM', dead, token) end
  end
end
return {removed, 0, redis.call('SCARD', dead) > 0 and 1 or 0}
"""
)

#: KEYS: members set, info hash, alive set
#: ARGV: none
#: Live connections of a room: {member, info-json-or-false, ...}: those of
#: nodes whose liveness has not expired (Redis' clock); a dead node's
#: entries stop being listed before the sweep removes them.
PRESENCE_LIST = LuaScript(
    _PRESENCE
    + """
local live = liveness(KEYS[3], now_ms())
local out = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if live(token_of(member)) then
    out[#out + 1] = member
    out[#out + 1] = redis.call('HGET', KEYS[2], user_of(member)) or ''
  end
end
return out
"""
)

#: KEYS: __online__'s counts hash, its members set, alive set
#: ARGV: user ids
#: The given users with a connection on a live node: {user, ...}.  The
#: counts answer "none" at once; a user with some has their members read by
#: lexical range (every score is 0): "<user>|" up to "<user>}" ("}" follows
#: "|"), which holds every member of the user and those of users whose id
#: starts with "<user>|", told apart by user_of.  O(the users' connections).
PRESENCE_ONLINE = LuaScript(
    _PRESENCE
    + """
local live = liveness(KEYS[3], now_ms())
local out = {}
for _, user in ipairs(ARGV) do
  local n = redis.call('HGET', KEYS[1], user)
  if n and tonumber(n) > 0 then
    for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], '[' .. user .. '|',
                                       '(' .. user .. '}')) do
      if user_of(member) == user and live(token_of(member)) then
        out[#out + 1] = user
        break
      end
    end
  end
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
