/**
 * The error tree of oribus, as the Python SDK has it (`oribus/errors.py`):
 *
 *     OribusError                 base; .code is the wire name, .retryable the policy
 *     ├── Conflict                the commit was refused; .stale lists every offending key
 *     │   └── Aborted             aborted without a stale key (lock held, coordinator gave up)
 *     ├── SessionExpired          part of the session's read set may have been lost: fail closed
 *     ├── InvalidRequest          malformed key, wrong type, unknown version, refused body...
 *     │   ├── ValueTooLarge       a value over the configured maximum
 *     │   └── HistoryTruncated    a watch asked for versions older than the kept history
 *     ├── LimitExceeded           a bounded resource is full
 *     ├── Unavailable             the bus cannot be reached, or answered 503; retryable
 *     │   └── WatchLagged         a watcher fell behind and was cut off (the watch resumes)
 *     ├── Unauthenticated         no token, or one the bus refuses (401; details.reason says why)
 *     ├── PermissionDenied        the token's roles do not allow it (403; names the key and the rule)
 *     ├── DataCorrupted           a log or snapshot failed its checksum
 *     └── DataDirLocked           another process has the data directory open
 *
 * `errorFromResponse` is the one place HTTP answers become errors.
 */

/** One offending key of a refused commit. */
export interface Stale {
  key: string;
  /** The version the session read or expected (null: not read). */
  version: number | null;
  /** The key's current version at the commit point. */
  current: number;
  reason: "stale_read" | "expected_version" | "locked" | "aborted" | string;
}

export class OribusError extends Error {
  /** The wire name of the error (`Conflict`, `SessionExpired`, or a gateway code such as `BodyTooLarge`). */
  readonly code: string;
  readonly details: Record<string, unknown>;
  /** The HTTP status the bus answered with, when it answered. */
  readonly status: number | undefined;
  /** May repeating the same request succeed? */
  get retryable(): boolean {
    return false;
  }

  constructor(message = "", options: { code?: string; details?: Record<string, unknown>; status?: number; cause?: unknown } = {}) {
    const code = options.code ?? new.target.defaultCode;
    super(message || code, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.details = options.details ?? {};
    this.status = options.status;
  }

  static get defaultCode(): string {
    return "Internal";
  }
}

export class Conflict extends OribusError {
  /** Every offending key, with the version read or expected, the current one and why. */
  readonly stale: Stale[];
  override get retryable(): boolean {
    return true;
  }
  static override get defaultCode(): string {
    return "Conflict";
  }

  constructor(message = "", options: ConstructorParameters<typeof OribusError>[1] & { stale?: Stale[] } = {}) {
    const stale = options.stale ?? [];
    if (!message) {
      const parts = stale.map((s) => `${s.key} (${s.reason}: had ${s.version}, now ${s.current})`);
      message = parts.length ? `commit refused: ${parts.join(", ")}` : "commit refused";
    }
    super(message, options);
    this.stale = stale;
  }
}

export class Aborted extends Conflict {
  static override get defaultCode(): string {
    return "Aborted";
  }
}

export class SessionExpired extends OribusError {
  static override get defaultCode(): string {
    return "SessionExpired";
  }
}

export class InvalidRequest extends OribusError {
  static override get defaultCode(): string {
    return "InvalidRequest";
  }
}

export class ValueTooLarge extends InvalidRequest {
  static override get defaultCode(): string {
    return "ValueTooLarge";
  }
}

export class HistoryTruncated extends InvalidRequest {
  static override get defaultCode(): string {
    return "HistoryTruncated";
  }
}

export class LimitExceeded extends OribusError {
  static override get defaultCode(): string {
    return "LimitExceeded";
  }
}

export class Unavailable extends OribusError {
  override get retryable(): boolean {
    return true;
  }
  static override get defaultCode(): string {
    return "Unavailable";
  }
}

export class WatchLagged extends Unavailable {
  static override get defaultCode(): string {
    return "WatchLagged";
  }
}

export class Unauthenticated extends OribusError {
  static override get defaultCode(): string {
    return "Unauthenticated";
  }
}

export class PermissionDenied extends OribusError {
  static override get defaultCode(): string {
    return "PermissionDenied";
  }
}

export class DataCorrupted extends OribusError {
  static override get defaultCode(): string {
    return "DataCorrupted";
  }
}

export class DataDirLocked extends OribusError {
  static override get defaultCode(): string {
    return "DataDirLocked";
  }
}

type ErrorClass = new (message?: string, options?: ConstructorParameters<typeof Conflict>[1]) => OribusError;

/** The bus's error codes, each to its class. */
const BY_CODE: Record<string, ErrorClass> = {
  Internal: OribusError,
  Conflict,
  Aborted,
  SessionExpired,
  InvalidRequest,
  ValueTooLarge,
  HistoryTruncated,
  LimitExceeded,
  Unavailable,
  WatchLagged,
  Unauthenticated,
  PermissionDenied,
  DataCorrupted,
  DataDirLocked,
  // refusals of the gateway itself (specs/http.md, "Errors"): the request never reached the bus
  BodyTooLarge: ValueTooLarge,
};

/** A code the bus does not define (a gateway refusal, a proxy's answer): its class by HTTP status. */
function classOfStatus(status: number): ErrorClass {
  if (status === 429) return LimitExceeded;
  if (status === 408 || status === 502 || status === 503 || status === 504) return Unavailable;
  if (status >= 400 && status < 500) return InvalidRequest;
  return OribusError;
}

function staleOf(raw: unknown): Stale[] {
  if (!Array.isArray(raw)) return [];
  return raw.map((s) => {
    const [key, version, current, reason] = Array.isArray(s) ? s : [];
    return { key: String(key), version: version ?? null, current: Number(current), reason: String(reason) };
  });
}

/** The error an HTTP error answer stands for: `body` is its parsed JSON (or anything else). */
export function errorFromResponse(status: number, body: unknown): OribusError {
  const b = (body && typeof body === "object" ? body : {}) as Record<string, unknown>;
  const code = typeof b.code === "string" ? b.code : typeof b.error === "string" ? b.error : undefined;
  const cls = (code !== undefined ? BY_CODE[code] : undefined) ?? classOfStatus(status);
  const message = typeof b.message === "string" ? b.message : `HTTP ${status}${code ? ` ${code}` : ""}`;
  const details = b.details && typeof b.details === "object" ? (b.details as Record<string, unknown>) : {};
  return new cls(message, { code: code ?? undefined, details, status, stale: staleOf(b.stale) });
}
