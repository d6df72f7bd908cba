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
/** An inclusive range of chunk numbers, [first, last]. */
export type GapRange = readonly [number, number];
/** A message of a room as the client holds it after an event (a new object each time). */
export interface MessageSnapshot {
    readonly room: string;
    readonly messageId: string;
    readonly sessionId: string;
    readonly role: string;
    /** the text so far: the chunks' `content` concatenated in `seq` order */
    readonly text: string;
    /** the last chunk held; null for a whole message (published without `seq`) */
    readonly lastSeq: number | null;
    /** true once the message's last chunk is held (always true for a whole message) */
    readonly done: boolean;
    /** the error the message ended with (`done` is then true), else null */
    readonly error: string | null;
    /** chunks whose text is not in `text`: reported missing by the server, or before the first held */
    readonly gaps: readonly GapRange[];
    /**
     * true when the client lost track of the message: after a reconnect whose
     * recovery failed (`recovered: false`) it was no longer streaming, or its room
     * was left or forgotten.  Final: `text` is what arrived before; reload it from
     * the application's own history.
     */
    readonly lost: boolean;
    /** false for a whole message (published without `seq`) */
    readonly streamed: boolean;
    /** the message's fields as the server delivers them (session_id, message_id, role, extras) */
    readonly fields: Readonly<Record<string, unknown>>;
}
/** An event of a streamed message that breaks PROTOCOL.md section 5.1 (reported on `error`, not thrown). */
export declare class MessageStreamError extends Error {
    readonly room: string;
    readonly messageId: string;
    constructor(room: string, messageId: string, what: string);
}
/** Called with a snapshot after every change of a message. */
export type MessageHandler = (message: MessageSnapshot) => void;
type Json = Record<string, unknown>;
/**
 * The messages of one room, as snapshots: a callback, an async iterator, or
 * both.  Made by `client.messages(room, handler?)`.  The iterator gives the
 * latest snapshot of each message that changed since the previous step (a
 * slow reader skips intermediate snapshots of a message, never a message),
 * and ends when the feed or the client is closed.
 */
export declare class MessageFeed implements AsyncIterableIterator<MessageSnapshot> {
    readonly room: string;
    private readonly _handler;
    private readonly _report;
    private readonly _detach;
    /** snapshots not yet taken by the iterator, the latest one per message, in order of first change */
    private readonly _queued;
    private _waiting;
    private _closed;
    /** @internal made by the client */
    constructor(room: string, handler: MessageHandler | null, report: (error: Error) => void, detach: (feed: MessageFeed) => void);
    get closed(): boolean;
    /** Stop: no more snapshots; an iteration in progress ends. */
    close(): void;
    /** @internal a message changed */
    _deliver(snapshot: MessageSnapshot): void;
    /** true once the iterator was asked for a snapshot: only then does a feed with a handler queue */
    private _iterating;
    next(): Promise<IteratorResult<MessageSnapshot>>;
    return(): Promise<IteratorResult<MessageSnapshot>>;
    [Symbol.asyncIterator](): MessageFeed;
}
/**
 * The messages in progress of every room, and the feeds listening to them.
 * One per client; core.ts calls `apply` for each `session.message` event.
 */
export declare class MessageTracker {
    /** in progress, by room and message id; least recently updated first */
    private readonly _inProgress;
    /** finished, by room and message id: their last seq */
    private readonly _finished;
    private readonly _feeds;
    private readonly _report;
    constructor(report: (error: Error) => void);
    /** A feed of the messages of `room`; the handler gets each message in progress at once. */
    subscribe(room: string, handler: MessageHandler | null): MessageFeed;
    /** One `session.message` event's `data`, of `room`: the rules of section 5.1. */
    apply(room: string, data: Json): void;
    /**
     * A join with `since` came back with `recovered: false`: the messages of
     * `room` held in progress that are not in its `streaming` list ended (or
     * expired) while the connection was down.  They are reported lost.
     */
    lose(room: string, streaming: ReadonlySet<string>): void;
    /** The client no longer is in `room` (left, revoked, refused): its messages in progress are lost. */
    forget(room: string): void;
    /** The client closed for good: every feed ends. */
    close(): void;
    private _emit;
    private _violation;
}
export {};
