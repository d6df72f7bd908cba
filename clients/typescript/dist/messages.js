/**
 * Streamed messages (PROTOCOL.md section 5.1): the text of each AI answer of a
 * room, kept by `message_id` and grown by the `session.message` events that
 * carry `seq`.  Hand-written runtime; the client (core.ts) feeds it every
 * `session.message` it receives: live events, a join's `missed` replay and a
 * join's `streaming` list.
 *
 * The client rules of section 5.1, applied to each event (`seq`..`last_seq`)
 * of a message the client holds up to `last_seq` = n (nothing held: n = -1):
 * - `last_seq` <= n: ignored (a repeat, or older than what is held);
 * - `seq` = 0: replaces what is held (the whole message so far);
 * - `seq` = n + 1: appended.
 * The server orders the chunks (the client keeps no reorder buffer).  Anything
 * else breaks the contract and is reported on the client's `error` event:
 * `seq` > n + 1 is appended with the chunks in between listed in `gaps`, an
 * event overlapping what is held is ignored.  One exception is not an error:
 * the first event of a message the client never held may start past 0 (a join
 * with a `since` the application kept, from the middle of the message); the
 * chunks before it are listed in `gaps`.
 *
 * A `session.message` without `seq` is a whole message: one snapshot, done.
 */
/** An event of a streamed message that breaks PROTOCOL.md section 5.1 (reported on `error`, not thrown). */
export class MessageStreamError extends Error {
    constructor(room, messageId, what) {
        super(`session.message ${messageId} in ${room} breaks PROTOCOL.md 5.1: ${what}`);
        this.name = "MessageStreamError";
        this.room = room;
        this.messageId = messageId;
    }
}
/** Data fields of an event that describe the event, not the message. */
const EVENT_FIELDS = new Set(["content", "seq", "last_seq", "done", "gaps", "error"]);
/** Messages in progress the client keeps at most (the least recently updated is dropped, as lost). */
const MAX_IN_PROGRESS = 1000;
/** Finished messages remembered, so that a repeat of their events is recognised. */
const MAX_FINISHED = 1000;
/**
 * The messages of one room, as snapshots: a callback, an async iterator, or
 * both.  Made by `client.messages(room, handler?)`.  The iterator gives the
 * latest snapshot of each message that changed since the previous step (a
 * slow reader skips intermediate snapshots of a message, never a message),
 * and ends when the feed or the client is closed.
 */
export class MessageFeed {
    /** @internal made by the client */
    constructor(room, handler, report, detach) {
        /** snapshots not yet taken by the iterator, the latest one per message, in order of first change */
        this._queued = new Map();
        this._waiting = null;
        this._closed = false;
        /** true once the iterator was asked for a snapshot: only then does a feed with a handler queue */
        this._iterating = false;
        this.room = room;
        this._handler = handler;
        this._report = report;
        this._detach = detach;
    }
    get closed() {
        return this._closed;
    }
    /** Stop: no more snapshots; an iteration in progress ends. */
    close() {
        if (this._closed)
            return;
        this._closed = true;
        this._detach(this);
        this._queued.clear();
        const waiting = this._waiting;
        this._waiting = null;
        waiting?.({ value: undefined, done: true });
    }
    /** @internal a message changed */
    _deliver(snapshot) {
        if (this._closed)
            return;
        const waiting = this._waiting;
        if (waiting) {
            this._waiting = null;
            waiting({ value: snapshot, done: false });
        }
        else if (!this._handler || this._iterating) {
            // a feed with a handler that nobody iterates keeps no queue (nobody would read it)
            this._queued.set(snapshot.messageId, snapshot); // replaces an older one, in its place
        }
        if (this._handler) {
            try {
                this._handler(snapshot); // closing the feed there empties the queue
            }
            catch (e) {
                this._report(e instanceof Error ? e : new Error(String(e)));
            }
        }
    }
    next() {
        this._iterating = true;
        const first = this._queued.entries().next();
        if (!first.done) {
            const [id, snapshot] = first.value;
            this._queued.delete(id);
            return Promise.resolve({ value: snapshot, done: false });
        }
        if (this._closed)
            return Promise.resolve({ value: undefined, done: true });
        if (this._waiting)
            return Promise.reject(new Error("MessageFeed: next() called again before the previous step resolved"));
        return new Promise((resolve) => (this._waiting = resolve));
    }
    return() {
        this.close();
        return Promise.resolve({ value: undefined, done: true });
    }
    [Symbol.asyncIterator]() {
        this._iterating = true;
        return this;
    }
}
/**
 * The messages in progress of every room, and the feeds listening to them.
 * One per client; core.ts calls `apply` for each `session.message` event.
 */
export class MessageTracker {
    constructor(report) {
        /** in progress, by room and message id; least recently updated first */
        this._inProgress = new Map();
        /** finished, by room and message id: their last seq */
        this._finished = new Map();
        this._feeds = new Map();
        this._report = report;
    }
    /** A feed of the messages of `room`; the handler gets each message in progress at once. */
    subscribe(room, handler) {
        const feed = new MessageFeed(room, handler, this._report, (f) => this._feeds.get(room)?.delete(f));
        let feeds = this._feeds.get(room);
        if (!feeds)
            this._feeds.set(room, (feeds = new Set()));
        feeds.add(feed);
        for (const state of [...this._inProgress.values()]) {
            if (state.room === room)
                feed._deliver(snapshot(state, false, false));
        }
        return feed;
    }
    /** One `session.message` event's `data`, of `room`: the rules of section 5.1. */
    apply(room, data) {
        const rawId = data.message_id;
        if (typeof rawId !== "string" && typeof rawId !== "number")
            return; // not a message of the catalogue
        const messageId = String(rawId);
        const seq = data.seq;
        const content = typeof data.content === "string" ? data.content : "";
        if (seq === undefined || seq === null) {
            this._emit(room, {
                room, messageId, sessionId: String(data.session_id ?? ""), role: String(data.role ?? ""), text: content,
                lastSeq: null, done: true, error: typeof data.error === "string" ? data.error : null, gaps: [],
                lost: false, streamed: false, fields: fieldsOf(data),
            });
            return;
        }
        const lastSeq = data.last_seq === undefined || data.last_seq === null ? seq : data.last_seq;
        if (!isSeq(seq) || !isSeq(lastSeq) || lastSeq < seq) {
            this._violation(room, messageId, `seq ${JSON.stringify(seq)}, last_seq ${JSON.stringify(data.last_seq)}: not a chunk range`);
            return;
        }
        const key = `${room}\u0000${messageId}`;
        const finishedAt = this._finished.get(key);
        if (finishedAt !== undefined) {
            if (lastSeq > finishedAt)
                this._violation(room, messageId, `chunks ${seq}..${lastSeq} after its last one (${finishedAt}, done): ignored`);
            return;
        }
        let state = this._inProgress.get(key);
        const held = state ? state.lastSeq : -1;
        if (lastSeq <= held)
            return; // a repeat, or older than what is held
        const gaps = gapsOf(data.gaps);
        if (seq === 0 || !state) {
            state = { room, messageId, fields: fieldsOf(data), text: content, lastSeq, gaps: seq === 0 ? gaps : [[0, seq - 1], ...gaps] };
        }
        else if (seq === held + 1) {
            state.text += content;
            state.lastSeq = lastSeq;
            state.gaps.push(...gaps);
        }
        else if (seq > held + 1) {
            this._violation(room, messageId, `seq ${seq} follows last_seq ${held}: chunks ${held + 1}..${seq - 1} are listed as missing`);
            state.text += content;
            state.lastSeq = lastSeq;
            state.gaps.push([held + 1, seq - 1], ...gaps);
        }
        else {
            this._violation(room, messageId, `chunks ${seq}..${lastSeq} overlap the ones held (to ${held}): ignored`);
            return;
        }
        this._inProgress.delete(key); // re-inserted last: the most recently updated
        const done = data.done === true;
        const error = typeof data.error === "string" ? data.error : null;
        if (done) {
            this._finished.set(key, lastSeq);
            if (this._finished.size > MAX_FINISHED)
                this._finished.delete(this._finished.keys().next().value);
        }
        else {
            this._inProgress.set(key, state);
            if (this._inProgress.size > MAX_IN_PROGRESS) {
                const [oldestKey, oldest] = this._inProgress.entries().next().value;
                this._inProgress.delete(oldestKey);
                this._emit(oldest.room, snapshot(oldest, false, true));
            }
        }
        this._emit(room, snapshot(state, done, false, error));
    }
    /**
     * A join with `since` came back with `recovered: false`: the messages of
     * `room` held in progress that are not in its `streaming` list ended (or
     * expired) while the connection was down.  They are reported lost.
     */
    lose(room, streaming) {
        for (const [key, state] of [...this._inProgress]) {
            if (state.room !== room || streaming.has(state.messageId))
                continue;
            this._inProgress.delete(key);
            this._emit(room, snapshot(state, false, true));
        }
    }
    /** The client no longer is in `room` (left, revoked, refused): its messages in progress are lost. */
    forget(room) {
        this.lose(room, new Set());
    }
    /** The client closed for good: every feed ends. */
    close() {
        for (const feeds of [...this._feeds.values()])
            for (const feed of [...feeds])
                feed.close();
        this._feeds.clear();
    }
    _emit(room, message) {
        for (const feed of [...(this._feeds.get(room) ?? [])])
            feed._deliver(message);
    }
    _violation(room, messageId, what) {
        this._report(new MessageStreamError(room, messageId, what));
    }
}
function isSeq(value) {
    return typeof value === "number" && Number.isInteger(value) && value >= 0;
}
function fieldsOf(data) {
    const fields = {};
    for (const [name, value] of Object.entries(data))
        if (!EVENT_FIELDS.has(name))
            fields[name] = value;
    return fields;
}
function gapsOf(value) {
    if (!Array.isArray(value))
        return [];
    return value
        .filter((g) => Array.isArray(g) && g.length === 2 && isSeq(g[0]) && isSeq(g[1]))
        .map(([first, last]) => [first, last]);
}
function snapshot(state, done, lost, error = null) {
    return {
        room: state.room,
        messageId: state.messageId,
        sessionId: String(state.fields.session_id ?? ""),
        role: String(state.fields.role ?? ""),
        text: state.text,
        lastSeq: state.lastSeq,
        done,
        error,
        gaps: state.gaps.map(([first, last]) => [first, last]),
        lost,
        streamed: true,
        fields: { ...state.fields },
    };
}
