// The dashboard's pure logic: URLs, event bookkeeping, feed fallback, form checks.
// Nothing here touches the DOM, the network, a clock or randomness: time and random
// numbers are arguments, so every rule can be checked outside a browser.

// Every route is relative to the page's directory (".../dashboard/"), because the same files
// are served by the local daemon, at the relay's root and under /d/<daemon_id>/ on the relay.
export const ROUTES = Object.freeze({
  health: "../health",
  peers: "../peers",
  events: "../events",
  eventStream: "../events/stream",
  ws: "../ws",
  notify: "../notify",
  daemons: "../api/v1/daemons",
});

// Event types the daemon names in its SSE stream; EventSource only delivers named events
// to listeners registered for that exact name.
export const EVENT_TYPES = Object.freeze(["message", "peer_joined", "peer_left"]);

// Bounds and timings, in one place.
export const SETTINGS = Object.freeze({
  maxEventsShown: 200, // events kept in the DOM; older ones are dropped
  eventPageSize: 200, // `limit` of one ../events catch-up request
  maxCatchUpPages: 10, // catch-up requests per resync, so a huge backlog cannot loop forever
  maxEventTextChars: 4000, // longer message text is shortened on screen
  sseMaxFailures: 3, // EventSource failures in a row before trying the WebSocket feed
  wsMaxFailures: 3, // WebSocket failures in a row before polling ../events
  stableAfterMs: 30000, // a connection open this long has its failure count forgiven
  openTimeoutMs: 10000, // a feed that has not opened by then counts as failed
  retryBaseMs: 1000,
  retryCapMs: 30000,
  requestTimeoutMs: 10000,
  healthIntervalMs: 5000,
  peersIntervalMs: 30000,
  daemonsIntervalMs: 15000,
  pollIntervalMs: 5000,
});

/** Absolute URL of a route for the page at `pageHref`. */
export function apiUrl(route, pageHref) {
  return new URL(route, pageHref);
}

/** URL of `../events?after=<after>&limit=<limit>` for the page at `pageHref`. */
export function eventsUrl(pageHref, after, limit) {
  const url = new URL(ROUTES.events, pageHref);
  url.searchParams.set("after", String(after));
  url.searchParams.set("limit", String(limit));
  return url;
}

/** The ws: or wss: URL of the daemon's WebSocket feed, matching the page's scheme. */
export function wsUrl(pageHref) {
  const url = new URL(ROUTES.ws, pageHref);
  // "http:" becomes "ws:" and "https:" becomes "wss:".
  url.protocol = url.protocol.replace("http", "ws");
  return url;
}

const DAEMON_ID = /^[A-Za-z0-9._-]{1,64}$/;
const DAEMON_PAGE = /\/d\/([^/]+)\/dashboard\/(?:index\.html)?$/;

/** True for a daemon id that is safe to put in a path segment. */
export function isValidDaemonId(id) {
  // "." and ".." match the id pattern but are dot segments in a URL path.
  return typeof id === "string" && DAEMON_ID.test(id) && id !== "." && id !== "..";
}

/** The daemon id in a relay page path ".../d/<id>/dashboard/", or null. */
export function pageDaemonId(pathname) {
  const match = DAEMON_PAGE.exec(pathname);
  if (match === null) return null;
  let id;
  try {
    id = decodeURIComponent(match[1]);
  } catch {
    return null;
  }
  return isValidDaemonId(id) ? id : null;
}

/**
 * Relative link from the page at `pathname` to the dashboard of daemon `id` on the relay,
 * or null when `id` is not a valid daemon id.
 */
export function daemonHref(pathname, id) {
  if (!isValidDaemonId(id)) return null;
  if (pageDaemonId(pathname) !== null) return `../../${id}/dashboard/`;
  return `../d/${id}/dashboard/`;
}

/** Relative link from the page at `pathname` to the relay's root (its sign-in page). */
export function rootHref(pathname) {
  return pageDaemonId(pathname) !== null ? "../../../" : "../";
}

/** Delay before feed retry number `failures` (1-based): full jitter, capped. */
export function retryDelayMs(failures, random) {
  const exponent = Math.min(Math.max(failures - 1, 0), 16);
  const ceiling = Math.min(SETTINGS.retryCapMs, SETTINGS.retryBaseMs * 2 ** exponent);
  // Never zero: a broken endpoint must not be retried in a tight loop.
  return Math.max(250, Math.floor(ceiling * random));
}

/** True when `value` has the shape of a daemon event. */
export function isEvent(value) {
  return (
    value !== null &&
    typeof value === "object" &&
    Number.isSafeInteger(value.id) &&
    value.id >= 0 &&
    typeof value.type === "string"
  );
}

/**
 * The events shown, oldest first, without duplicates, at most `limit` of them.
 *
 * `add(event)` returns `{index, evicted}` (the new event's position and the events dropped to
 * respect the bound) or null when the event is malformed, already held, or older than
 * everything held in a full buffer. `maxId` is the newest id ever accepted, for catch-ups.
 */
export class EventBuffer {
  constructor(limit) {
    this.limit = limit;
    this.events = [];
    this.ids = new Set();
    this.maxId = 0;
  }

  add(event) {
    if (!isEvent(event) || this.ids.has(event.id)) return null;
    const full = this.events.length >= this.limit;
    if (full && event.id < this.events[0].id) return null;
    // Feeds deliver in order, so the insertion point is almost always the end.
    let index = this.events.length;
    while (index > 0 && this.events[index - 1].id > event.id) index -= 1;
    this.events.splice(index, 0, event);
    this.ids.add(event.id);
    this.maxId = Math.max(this.maxId, event.id);
    const evicted = this.events.splice(0, Math.max(this.events.length - this.limit, 0));
    for (const old of evicted) this.ids.delete(old.id);
    return { index: index - evicted.length, evicted };
  }

  newest() {
    return this.events.length > 0 ? this.events[this.events.length - 1] : null;
  }

  clear() {
    this.events = [];
    this.ids.clear();
    this.maxId = 0;
  }
}

/**
 * Whether the daemon still holds `newest` (the last event shown), judged from the answer to
 * `../events?after=<newest.id - 1>&limit=1`. False means its event log restarted (or moved on
 * past what was shown): the shown events no longer line up with its ids.
 */
export function sameEventLog(newest, answer) {
  if (!Array.isArray(answer) || answer.length !== 1 || !isEvent(answer[0])) return false;
  const held = answer[0];
  return held.id === newest.id && held.type === newest.type && held.time === newest.time;
}

/**
 * Which live feed to use: "sse" (EventSource), then "ws" (the WebSocket feed) after
 * repeated EventSource failures, then "poll" (../events) after repeated WebSocket failures.
 * `daemonBack()` starts over with "sse" once the daemon is reachable again.
 */
export class FeedPolicy {
  constructor() {
    this.reset();
  }

  reset() {
    this.mode = "sse";
    this.failures = 0;
    this.openedAt = null;
  }

  opened(now) {
    this.openedAt = now;
  }

  /** Record a failure of the current feed at time `now` (ms); returns the mode to use. */
  failed(now) {
    const stable = this.openedAt !== null && now - this.openedAt >= SETTINGS.stableAfterMs;
    // A feed that stayed up for a while and then dropped is a fresh problem, not a pattern.
    this.failures = stable ? 1 : this.failures + 1;
    this.openedAt = null;
    const limit = { sse: SETTINGS.sseMaxFailures, ws: SETTINGS.wsMaxFailures }[this.mode];
    if (limit !== undefined && this.failures >= limit) {
      this.mode = this.mode === "sse" ? "ws" : "poll";
      this.failures = 0;
    }
    return this.mode;
  }

  daemonBack() {
    this.reset();
    return this.mode;
  }
}

function text(value) {
  if (typeof value === "string") return value;
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function shorten(value, max) {
  return value.length > max ? `${value.slice(0, max - 1)}…` : value;
}

/**
 * Plain-text summary of an event: `{title, body}`. The strings are meant for `textContent`;
 * user text is returned as is (shortened), never interpreted.
 */
export function describeEvent(event) {
  const data = event.data !== null && typeof event.data === "object" ? event.data : {};
  const max = SETTINGS.maxEventTextChars;
  if (event.type === "message") {
    const from = text(data.from);
    const to = text(data.to) || "(no recipient given)";
    const via = text(data.via);
    const title = `${from ? `${from} → ` : "to "}${to}${via ? ` (via ${via})` : ""}`;
    return { title, body: shorten(text(data.text), max) };
  }
  if (event.type === "peer_joined" || event.type === "peer_left") {
    const name = text(data.name ?? data.peer) || "a peer";
    return { title: `${name} ${event.type === "peer_joined" ? "joined" : "left"}`, body: "" };
  }
  return { title: event.type, body: shorten(text(data), max) };
}

/**
 * Summary of the connector status found in `../health` under `relay`:
 * `{state, label, detail, since}` with state one of connected, connecting, down, disabled,
 * unknown, and `since` a time in seconds (when the link came up, or of the last error) or null.
 */
export function describeRelayLink(relay) {
  if (relay === null || typeof relay !== "object") {
    return { state: "unknown", label: "Unknown", detail: "", since: null };
  }
  const error = text(relay.last_error ?? relay.error);
  const errorAt = typeof relay.last_error_at === "number" ? relay.last_error_at : null;
  switch (relay.state) {
    case "connected": {
      const rtt =
        typeof relay.rtt_ms === "number" ? `${Math.round(relay.rtt_ms)} ms round trip` : "";
      const since = typeof relay.connected_since === "number" ? relay.connected_since : null;
      return { state: "connected", label: "Connected", detail: rtt, since };
    }
    case "connecting":
      return {
        state: "connecting",
        label: "Connecting",
        detail: error ? `last error: ${error}` : "",
        since: error ? errorAt : null,
      };
    case "down":
      return { state: "down", label: "Down", detail: error || "no error reported", since: errorAt };
    case "disabled":
      return {
        state: "disabled",
        label: "Disabled",
        detail: "this daemon runs local only",
        since: null,
      };
    default:
      return {
        state: "unknown",
        label: text(relay.state) || "Unknown",
        detail: error,
        since: null,
      };
  }
}

/**
 * The error of a failed API answer as `{code, detail}`. `status` 0 means no answer at all.
 */
export function describeFailure(status, body) {
  if (status === 0) {
    return {
      code: "unreachable",
      detail: "No answer (network error or timeout). It may or may not have been delivered.",
    };
  }
  if (body !== null && typeof body === "object" && typeof body.error === "string") {
    const detail = text(body.detail) || `The request failed (HTTP ${status}).`;
    return { code: body.error, detail };
  }
  return { code: `http_${status}`, detail: `The request failed (HTTP ${status}).` };
}

const PEER_TARGET = /^[^\s@]+(?:@[^\s@]+)?$/;

/**
 * Check the send form's values. Returns null when they can be sent, else `{field, message}`
 * naming the first bad field ("to", "text" or "from").
 */
export function validateNotify({ to, text: body, from }) {
  if (to === "") return { field: "to", message: "Enter the peer to send to." };
  if (!PEER_TARGET.test(to)) {
    return { field: "to", message: "Use a peer name, or peer@daemon, without spaces." };
  }
  if (body.trim() === "") return { field: "text", message: "Enter the message text." };
  if (/\s/.test(from)) return { field: "from", message: "The sender name cannot contain spaces." };
  return null;
}

/** The JSON body of POST ../notify for the form's values (`from` only when given), with the
 * message `id` when one is given. */
export function notifyBody({ to, text: body, from }, id) {
  const out = from === "" ? { to, text: body } : { to, text: body, from };
  if (id !== undefined) out.id = id;
  return out;
}

/** A new message id for POST ../notify: 128 random bits as 32 hex digits. Sending a message
 * again with the same id is a safe retry: the daemon delivers it once. */
export function newMessageId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}
