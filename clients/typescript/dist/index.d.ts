import { ClientCore } from "./core.js";
import type { CallOptions, ClientOptions, DirectEventMeta, RoomEventMeta } from "./core.js";
export * from "./core.js";
/** The server version the client was generated from. */
export declare const API_VERSION = "0.1.0";
export interface AuthAuthenticateParams {
    /** a JWT signed by a configured key */
    token: string;
}
export interface AuthResult {
    /** the token's exp, epoch seconds */
    expires_at: number;
    user_id: string;
}
export interface AuthRefreshParams {
    /** a JWT signed by a configured key */
    token: string;
}
export interface RefreshResult {
    expires_at: number;
}
export interface PresenceCountParams {
    room: string;
}
export interface PresenceCountResult {
    connections: number;
    room: string;
    users: number;
}
export interface PresenceListParams {
    room: string;
}
export interface PresenceEntry {
    connections: number;
    info: Record<string, unknown>;
    user_id: string;
}
export interface PresenceListResult {
    room: string;
    users: PresenceEntry[];
}
export interface RoomsJoinParams {
    room: string;
    /** the last cursor seen; replays what came after it */
    since?: string | null;
    /** a room token for this room */
    token?: string | null;
}
export interface JoinResult {
    cursor: string;
    /** the missed events, as the notifications live delivery sends */
    missed: Record<string, unknown>[];
    recovered: boolean;
    room: string;
    /** the room's streamed messages still streaming, each as one event with all of it so far (unless recovered: missed covers them) */
    streaming: Record<string, unknown>[];
}
export interface RoomsLeaveParams {
    room: string;
}
export interface RoomResult {
    room: string;
}
export interface RoomsResult {
    rooms: string[];
}
export interface RpcCancelParams {
    /** the id of a backend call of this connection (a string or a number) */
    id: unknown;
}
export interface CancelResult {
    /** false when no such call was in flight */
    cancelled: boolean;
    id: unknown;
}
export interface InfoResult {
    features: string[];
    node_id: string;
    protocol: number;
    version: string;
}
export interface PingResult {
    pong: boolean;
    /** epoch milliseconds */
    server_time: number;
}
/** A notification for everyone. */
export interface NotificationBroadcast {
    data?: Record<string, unknown> | null;
    level: "info" | "success" | "warning" | "error";
    message: string;
    title: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A notification for one user. */
export interface NotificationSent {
    data?: Record<string, unknown> | null;
    level: "info" | "success" | "warning" | "error";
    message: string;
    title: string;
    user_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A user's first connection entered a room. */
export interface PresenceJoined {
    info: Record<string, unknown>;
    room: string;
    user_id: string;
}
/** A user's last connection left a room. */
export interface PresenceLeft {
    room: string;
    user_id: string;
}
/** This connection was removed from a room (its new token does not grant it). */
export interface RoomRevoked {
    room: string;
}
/** The context of an AI session changed; clients reload it. */
export interface ContextUpdated {
    session_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** An AI session message, or one streamed chunk of it (PROTOCOL.md section 5.1: the server orders chunks by seq and keeps one history entry per message). */
export interface SessionMessage {
    content: string;
    /** true on a streamed message's last chunk */
    done?: boolean | null;
    /** on the last chunk: the message ended in an error state, with this text */
    error?: string | null;
    /** a streamed message's event: [first, last] ranges of chunks inside seq..last_seq reported missing */
    gaps?: number[][] | null;
    /** a streamed message's event: the last chunk it covers (seq is the first) */
    last_seq?: number | null;
    message_id: string;
    role: "user" | "assistant" | "system" | "tool";
    /** a streamed chunk's number in its message: 0, 1, 2, ... (the server orders chunks by it) */
    seq?: number | null;
    session_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A task of an AI session changed status. */
export interface TaskStatus {
    progress?: number | null;
    session_id: string;
    status: "queued" | "running" | "succeeded" | "failed" | "cancelled";
    task_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A file in a workspace was created, modified, deleted or renamed. */
export interface FileChanged {
    change: "created" | "modified" | "deleted" | "renamed";
    /** the former path, when renamed */
    old_path?: string | null;
    path: string;
    workspace_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A snapshot of a workspace was taken. */
export interface SnapshotCreated {
    snapshot_id: string;
    workspace_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** A workspace changed state (starting, running, stopped, ...). */
export interface StateChanged {
    state: string;
    workspace_id: string;
    /** other fields the producer sent */
    [key: string]: unknown;
}
/** Handlers of the events the server pushes, by event name. */
export interface ServerEvents {
    /** A notification for everyone (room event) */
    "notification.broadcast": (data: NotificationBroadcast, meta: RoomEventMeta) => void;
    /** A notification for this user (room event) */
    "notification.send": (data: NotificationSent, meta: RoomEventMeta) => void;
    /** A user joined a room (ephemeral) (direct event) */
    "presence.joined": (params: PresenceJoined, meta: DirectEventMeta) => void;
    /** A user left a room (ephemeral) (direct event) */
    "presence.left": (params: PresenceLeft, meta: DirectEventMeta) => void;
    /** This connection was removed from a room (direct event) */
    "rooms.revoked": (params: RoomRevoked, meta: DirectEventMeta) => void;
    /** A session's context changed (room event) */
    "session.context_updated": (data: ContextUpdated, meta: RoomEventMeta) => void;
    /** An AI session message or chunk (room event) */
    "session.message": (data: SessionMessage, meta: RoomEventMeta) => void;
    /** A session task changed status (room event) */
    "session.task_status": (data: TaskStatus, meta: RoomEventMeta) => void;
    /** A file in a workspace changed (room event) */
    "workspace.file_changed": (data: FileChanged, meta: RoomEventMeta) => void;
    /** A workspace snapshot was taken (room event) */
    "workspace.snapshot_created": (data: SnapshotCreated, meta: RoomEventMeta) => void;
    /** A workspace changed state (room event) */
    "workspace.state_changed": (data: StateChanged, meta: RoomEventMeta) => void;
}
export type EventName = keyof ServerEvents;
export type EventData<K extends EventName> = Parameters<ServerEvents[K]>[0];
/** room: params are {room, cursor, data}; direct: params are the payload. */
export declare const EVENT_KINDS: Readonly<Record<EventName, "room" | "direct">>;
/** A typed unrealon-ws client: one method per client-callable RPC. */
export declare class UnrealonClient extends ClientCore<ServerEvents> {
    constructor(options: ClientOptions);
    readonly auth: {
        /** Authenticate this connection with a token (or refresh it if already authenticated). */
        readonly authenticate: (params: AuthAuthenticateParams, options?: CallOptions) => Promise<AuthResult>;
        /** Swap in a newer token for the same user, moving the expiry. */
        readonly refresh: (params: AuthRefreshParams, options?: CallOptions) => Promise<RefreshResult>;
    };
    readonly presence: {
        /** How many users and connections are in a room this connection is in. */
        readonly count: (params: PresenceCountParams, options?: CallOptions) => Promise<PresenceCountResult>;
        /** Who is in a room this connection is in. */
        readonly list: (params: PresenceListParams, options?: CallOptions) => Promise<PresenceListResult>;
    };
    readonly rooms: {
        /** Join a room; with `since`, receive every event after that cursor first. */
        readonly join: (params: RoomsJoinParams, options?: CallOptions) => Promise<JoinResult>;
        /** Leave a room (not the implicit user:<id> and broadcast rooms). */
        readonly leave: (params: RoomsLeaveParams, options?: CallOptions) => Promise<RoomResult>;
        /** The rooms this connection is in, the implicit ones included. */
        readonly list: (options?: CallOptions) => Promise<RoomsResult>;
    };
    readonly rpc: {
        /** Cancel a backend call of this connection that is in flight */
        readonly cancel: (params: RpcCancelParams, options?: CallOptions) => Promise<CancelResult>;
        /** The OpenRPC document of the client-callable API */
        readonly discover: (options?: CallOptions) => Promise<Record<string, unknown>>;
    };
    readonly system: {
        /** Server version, protocol version, node id and features. */
        readonly info: (options?: CallOptions) => Promise<InfoResult>;
        /** Liveness check; also answers before authentication. */
        readonly ping: (options?: CallOptions) => Promise<PingResult>;
    };
}
