// The dashboard page: connection state, daemons (through the relay), peers, the live event
// feed and the send form. All text from the daemon goes into the page through textContent.

import {
  EVENT_TYPES,
  EventBuffer,
  FeedPolicy,
  ROUTES,
  SETTINGS,
  apiUrl,
  daemonHref,
  describeEvent,
  describeFailure,
  describeRelayLink,
  eventsUrl,
  newMessageId,
  notifyBody,
  pageDaemonId,
  retryDelayMs,
  rootHref,
  sameEventLog,
  validateNotify,
  wsUrl,
} from "./core.js";

// ---------------------------------------------------------------------------------------------
// DOM helpers

function byId(id) {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`the dashboard markup lacks #${id}`);
  return element;
}

/** A new element; `text` and `children` (nodes or strings) are inserted as text, never HTML. */
function el(tag, { className = "", text, attrs = {} } = {}, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function badge(kind, text) {
  return el("span", { className: `badge badge--${kind}`, text });
}

function formatTime(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return null;
  const date = new Date(seconds * 1000);
  const today = date.toDateString() === new Date().toDateString();
  return {
    label: today ? date.toLocaleTimeString() : date.toLocaleString(),
    iso: date.toISOString(),
  };
}

const ui = {
  banner: byId("banner"),
  currentDaemon: byId("current-daemon"),
  logoutForm: byId("logout-form"),
  access: byId("access-state"),
  daemon: byId("daemon-state"),
  relay: byId("relay-state"),
  feed: byId("feed-state"),
  daemonsSection: byId("daemons-section"),
  daemonsEmpty: byId("daemons-empty"),
  daemonsList: byId("daemons-list"),
  peersCount: byId("peers-count"),
  peersEmpty: byId("peers-empty"),
  peersList: byId("peers-list"),
  peerNames: byId("peer-names"),
  form: byId("notify-form"),
  to: byId("notify-to"),
  text: byId("notify-text"),
  from: byId("notify-from"),
  send: byId("notify-send"),
  result: byId("notify-result"),
  eventsCount: byId("events-count"),
  eventsNote: byId("events-note"),
  eventsList: byId("events-list"),
};

// ---------------------------------------------------------------------------------------------
// State

const state = {
  mode: "unknown", // "local" (served by the daemon), "relay", or "unknown" until known
  daemon: "unknown", // "online", "offline" or "unknown"
  health: null, // the last ../health answer
  failure: null, // {code, detail} of the last failed health check
  signedOut: false,
  daemons: null, // the last ../api/v1/daemons answer
  current: pageDaemonId(location.pathname), // the daemon this page shows, if known
  feedLabel: "Not started",
  feedKind: "neutral",
  peersStale: false,
};

// ---------------------------------------------------------------------------------------------
// Network

/** fetch with a timeout; resolves to {status, ok, body, redirected} (status 0: no answer). */
async function request(url, init = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), SETTINGS.requestTimeoutMs);
  try {
    const response = await fetch(url, {
      ...init,
      headers: { Accept: "application/json", ...(init.headers ?? {}) },
      cache: "no-store",
      credentials: "same-origin",
      signal: controller.signal,
    });
    let body = null;
    if ((response.headers.get("content-type") ?? "").includes("json")) {
      try {
        body = await response.json();
      } catch {
        body = null;
      }
    }
    return { status: response.status, ok: response.ok, body, redirected: response.redirected };
  } catch {
    return { status: 0, ok: false, body: null, redirected: false };
  } finally {
    clearTimeout(timer);
  }
}

function isSignedOut(answer) {
  // The relay answers 401 to an API call without a valid session, or redirects it to its
  // sign-in page (an HTML answer where JSON was expected).
  return answer.status === 401 || (answer.redirected && answer.ok && answer.body === null);
}

/** A task run now and then every `intervalMs`; calling the result runs it again now. */
function poller(intervalMs, task) {
  let timer = 0;
  let running = false;
  let again = false;
  async function run() {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      // A hidden tab (a phone in a pocket) skips its polls; it catches up when shown.
      if (!document.hidden) await task();
    } catch (error) {
      console.error(error);
    } finally {
      running = false;
      timer = setTimeout(run, again ? 0 : intervalMs);
      again = false;
    }
  }
  return run;
}

const checkHealth = poller(SETTINGS.healthIntervalMs, async () => {
  const answer = await request(apiUrl(ROUTES.health, location.href));
  if (answer.ok && typeof answer.body?.daemon_id === "string") {
    daemonOnline(answer.body);
  } else if (answer.ok) {
    // At the relay's root with no daemon online, ../health is the relay's own health: it names
    // no daemon, so no daemon is being shown.
    daemonOffline({ code: "daemon_offline", detail: "No daemon is connected with this key." });
  } else if (isSignedOut(answer)) {
    signedOut();
  } else {
    daemonOffline(describeFailure(answer.status, answer.body));
  }
});

const loadDaemons = poller(SETTINGS.daemonsIntervalMs, async () => {
  if (state.mode === "local") return;
  const answer = await request(apiUrl(ROUTES.daemons, location.href));
  if (answer.status === 404 && state.mode === "unknown") {
    // Only the relay has this route: the page is served by the daemon itself.
    state.mode = "local";
  } else if (isSignedOut(answer)) {
    signedOut();
  } else if (answer.ok && Array.isArray(answer.body?.daemons)) {
    state.mode = "relay";
    state.daemons = answer.body;
    const current = answer.body.current;
    state.current = typeof current === "string" ? current : pageDaemonId(location.pathname);
  }
  render();
});

const loadPeers = poller(SETTINGS.peersIntervalMs, async () => {
  if (state.daemon !== "online" || state.signedOut) return;
  const answer = await request(apiUrl(ROUTES.peers, location.href));
  if (answer.ok && Array.isArray(answer.body?.peers)) {
    state.peersStale = false;
    renderPeers(answer.body.peers);
  } else if (isSignedOut(answer)) {
    signedOut();
  } else {
    checkHealth();
  }
});

let peersRefresh = 0;
function schedulePeersRefresh() {
  // A burst of join/leave events costs one request.
  clearTimeout(peersRefresh);
  peersRefresh = setTimeout(loadPeers, 300);
}

function daemonOnline(health) {
  const back = state.daemon !== "online" || state.signedOut;
  state.daemon = "online";
  state.health = health;
  state.failure = null;
  state.signedOut = false;
  if (back) {
    loadPeers();
    feed.policy.daemonBack();
    startFeed();
    // The other daemons' rows may be as stale as this one's was: refresh them now too.
    if (state.mode !== "local") loadDaemons();
  }
  render();
}

function daemonOffline(failure) {
  const was = state.daemon;
  state.daemon = "offline";
  state.failure = failure;
  state.peersStale = true;
  if (was !== "offline") {
    stopFeed("Waiting for the daemon", "neutral");
    if (state.mode !== "local") loadDaemons();
  }
  render();
}

function signedOut() {
  if (!state.signedOut) stopFeed("Stopped: signed out", "neutral");
  state.signedOut = true;
  state.daemon = "unknown";
  render();
}

// ---------------------------------------------------------------------------------------------
// The live event feed: EventSource, then the WebSocket, then polling (see FeedPolicy)

const buffer = new EventBuffer(SETTINGS.maxEventsShown);
const eventNodes = new Map(); // event id -> its <li>

const feed = {
  policy: new FeedPolicy(),
  generation: 0, // bumped on every stop, so callbacks of an older connection are ignored
  source: null,
  socket: null,
  timer: 0,
  openTimer: 0,
  syncing: false,
  syncAgain: false,
};

function setFeed(label, kind) {
  state.feedLabel = label;
  state.feedKind = kind;
  renderStatus();
}

function stopFeed(label, kind) {
  feed.generation += 1;
  clearTimeout(feed.timer);
  clearTimeout(feed.openTimer);
  if (feed.source !== null) feed.source.close();
  if (feed.socket !== null) feed.socket.close();
  feed.source = null;
  feed.socket = null;
  setFeed(label, kind);
}

function startFeed() {
  stopFeed("Connecting", "warn");
  const generation = feed.generation;
  if (feed.policy.mode === "sse") openEventSource(generation);
  else if (feed.policy.mode === "ws") openSocket(generation);
  else startPolling(generation);
}

function feedOpened(generation, label) {
  if (generation !== feed.generation) return;
  clearTimeout(feed.openTimer);
  feed.policy.opened(Date.now());
  setFeed(label, "ok");
  resync();
}

function feedFailed(generation) {
  if (generation !== feed.generation) return;
  const before = feed.policy.mode;
  const mode = feed.policy.failed(Date.now());
  // An outage shows in ../health; ask now instead of at the next poll.
  checkHealth();
  if (mode !== before) {
    startFeed();
    return;
  }
  stopFeed("Reconnecting", "warn");
  const delay = retryDelayMs(feed.policy.failures, Math.random());
  feed.timer = setTimeout(() => {
    if (state.daemon !== "offline" && !state.signedOut) startFeed();
  }, delay);
}

function openEventSource(generation) {
  const source = new EventSource(apiUrl(ROUTES.eventStream, location.href));
  feed.source = source;
  feed.openTimer = setTimeout(() => feedFailed(generation), SETTINGS.openTimeoutMs);
  source.addEventListener("open", () => feedOpened(generation, "Live (server-sent events)"));
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (message) => {
      if (generation === feed.generation) receiveJson(message.data, (value) => value);
    });
  }
  // The daemon ends a stream whose reader fell behind with a "dropped" message; the browser
  // then resumes with Last-Event-ID. That reconnect is expected, not a failure to count.
  let dropped = false;
  source.addEventListener("dropped", () => {
    dropped = true;
  });
  source.addEventListener("error", () => {
    if (generation !== feed.generation) return;
    if (dropped && source.readyState === EventSource.CONNECTING) {
      dropped = false;
      setFeed("Reconnecting", "warn");
      return;
    }
    if (source.readyState === EventSource.CLOSED) {
      feedFailed(generation);
      return;
    }
    // The browser reconnects by itself and resumes with Last-Event-ID; the failure still
    // counts, so a stream that keeps dropping falls back to the WebSocket.
    const before = feed.policy.mode;
    if (feed.policy.failed(Date.now()) !== before) {
      startFeed();
      return;
    }
    setFeed("Reconnecting", "warn");
    checkHealth();
  });
}

function openSocket(generation) {
  let socket;
  try {
    socket = new WebSocket(wsUrl(location.href));
  } catch {
    feedFailed(generation);
    return;
  }
  feed.socket = socket;
  feed.openTimer = setTimeout(() => feedFailed(generation), SETTINGS.openTimeoutMs);
  socket.addEventListener("open", () => feedOpened(generation, "Live (WebSocket)"));
  socket.addEventListener("message", (message) => {
    if (generation !== feed.generation || typeof message.data !== "string") return;
    receiveJson(message.data, (value) => (value?.type === "event" ? value.event : null));
  });
  socket.addEventListener("close", () => feedFailed(generation));
}

function startPolling(generation) {
  setFeed(`Polling every ${SETTINGS.pollIntervalMs / 1000} s`, "warn");
  const tick = async () => {
    if (generation !== feed.generation) return;
    await resync();
    if (generation === feed.generation) feed.timer = setTimeout(tick, SETTINGS.pollIntervalMs);
  };
  tick();
}

function receiveJson(data, pick) {
  let value;
  try {
    value = JSON.parse(data);
  } catch {
    console.warn("ignored a feed message that is not JSON");
    return;
  }
  const event = pick(value);
  if (event !== null) addEvent(event);
}

/** Line the shown events up with the daemon's log, then fetch what the feed missed. */
async function resync() {
  if (feed.syncing) {
    feed.syncAgain = true;
    return;
  }
  feed.syncing = true;
  try {
    // Bounded: a resync requested while one runs is served by one more round at most.
    for (let round = 0; round < 2; round += 1) {
      feed.syncAgain = false;
      await checkEventLog();
      await catchUp();
      if (!feed.syncAgain) break;
    }
  } finally {
    feed.syncing = false;
  }
}

async function checkEventLog() {
  const newest = buffer.newest();
  if (newest === null || newest.id < 1) return;
  const answer = await request(eventsUrl(location.href, newest.id - 1, 1));
  if (!answer.ok || answer.body === null || sameEventLog(newest, answer.body.events)) return;
  // The daemon restarted (its ids start over) or moved far past what is shown.
  clearEvents();
  ui.eventsNote.textContent = "The daemon's event log started over; older events were cleared.";
  // A resumed EventSource would ask for ids after the old log's last one: open a fresh one.
  if (feed.source !== null) startFeed();
}

async function catchUp() {
  for (let page = 0; page < SETTINGS.maxCatchUpPages; page += 1) {
    const after = buffer.maxId;
    const answer = await request(eventsUrl(location.href, after, SETTINGS.eventPageSize));
    const events = answer.body?.events;
    if (!answer.ok || !Array.isArray(events)) {
      checkHealth();
      return;
    }
    for (const event of events) addEvent(event);
    if (events.length < SETTINGS.eventPageSize || buffer.maxId === after) return;
  }
}

function addEvent(event) {
  const added = buffer.add(event);
  if (added === null) return;
  for (const old of added.evicted) {
    eventNodes.get(old.id)?.remove();
    eventNodes.delete(old.id);
  }
  const node = renderEvent(event);
  eventNodes.set(event.id, node);
  // The list shows newest first: the new node goes right after the next newer one.
  const newer = buffer.events[added.index + 1];
  const anchor = newer === undefined ? undefined : eventNodes.get(newer.id);
  if (anchor === undefined) ui.eventsList.prepend(node);
  else anchor.after(node);
  renderEventsCount();
  if (event.type === "peer_joined" || event.type === "peer_left") schedulePeersRefresh();
}

function clearEvents() {
  buffer.clear();
  eventNodes.clear();
  ui.eventsList.replaceChildren();
  renderEventsCount();
}

// ---------------------------------------------------------------------------------------------
// Rendering

function renderEvent(event) {
  const { title, body } = describeEvent(event);
  const kind = EVENT_TYPES.includes(event.type) ? event.type : "other";
  const head = el("div", { className: "event__head" }, [
    el("span", { className: "event__type", text: event.type }),
  ]);
  const when = formatTime(event.time);
  if (when !== null) {
    const attrs = { datetime: when.iso };
    head.append(el("time", { className: "event__time", text: when.label, attrs }));
  }
  const item = el("li", { className: `event event--${kind}` }, [
    head,
    el("p", { className: "event__title", text: title }),
  ]);
  if (body) item.append(el("p", { className: "event__body", text: body }));
  return item;
}

function renderEventsCount() {
  const count = buffer.events.length;
  ui.eventsCount.textContent = count > 0 ? `(${count})` : "";
}

function renderPeers(peers) {
  const valid = peers.filter((peer) => typeof peer?.name === "string");
  valid.sort((a, b) => a.name.localeCompare(b.name));
  ui.peersList.replaceChildren(...valid.map(renderPeer));
  const options = valid.map((peer) => el("option", { attrs: { value: peer.name } }));
  ui.peerNames.replaceChildren(...options);
  renderPeersCount();
}

function renderPeer(peer) {
  const name = el("strong", { className: "row__name", text: peer.name });
  const item = el("li", { className: "row" }, [name]);
  const since = formatTime(peer.registered_at);
  if (since !== null) {
    item.append(
      el("span", { className: "row__detail" }, [
        "since ",
        el("time", { text: since.label, attrs: { datetime: since.iso } }),
      ]),
    );
  }
  const meta = peer.meta !== null && typeof peer.meta === "object" ? peer.meta : {};
  const pairs = Object.entries(meta)
    .filter(([, value]) => ["string", "number", "boolean"].includes(typeof value))
    .slice(0, 4)
    .map(([key, value]) => `${key}: ${value}`);
  if (pairs.length > 0) {
    const summary = pairs.join(" · ");
    const text = summary.length > 160 ? `${summary.slice(0, 159)}…` : summary;
    item.append(el("span", { className: "row__meta", text }));
  }
  return item;
}

function renderPeersCount() {
  const count = ui.peersList.children.length;
  ui.peersEmpty.hidden = count > 0;
  const stale = state.peersStale ? ", last known" : "";
  ui.peersCount.textContent = count > 0 ? `(${count}${stale})` : "";
}

function renderHeader() {
  let label;
  if (state.mode === "relay") {
    label = state.current ? `Daemon ${state.current}` : "No daemon selected";
  } else if (typeof state.health?.daemon_id === "string") {
    label = `Daemon ${state.health.daemon_id}`;
  } else {
    label = state.mode === "local" ? "Local daemon" : "Connecting…";
  }
  ui.currentDaemon.textContent = label;
  document.title = `Repowire · ${label}`;
  ui.logoutForm.hidden = state.mode !== "relay";
}

function setFact(node, kind, label, detail = "") {
  const parts = [badge(kind, label)];
  if (detail) parts.push(el("span", { className: "fact__detail", text: detail }));
  node.replaceChildren(...parts);
}

function renderStatus() {
  if (state.mode === "relay") setFact(ui.access, "neutral", "Through the relay");
  else if (state.mode === "local") setFact(ui.access, "neutral", "Local", "this machine");
  else setFact(ui.access, "neutral", "Checking…");

  if (state.signedOut) {
    setFact(ui.daemon, "neutral", "Unknown", "signed out");
  } else if (state.daemon === "online") {
    const health = state.health ?? {};
    const version = typeof health.version === "string" ? `version ${health.version}` : "";
    setFact(ui.daemon, "ok", "Online", [health.daemon_id, version].filter(Boolean).join(", "));
  } else if (state.daemon === "offline") {
    setFact(ui.daemon, "bad", "Offline");
  } else {
    setFact(ui.daemon, "neutral", "Checking…");
  }

  if (state.daemon === "online") {
    const link = describeRelayLink(state.health?.relay);
    const kind = { connected: "ok", connecting: "warn", down: "bad" }[link.state] ?? "neutral";
    const since = formatTime(link.since);
    const word = link.state === "connected" ? "since" : "at";
    const when = since === null ? "" : `${word} ${since.label}`;
    setFact(ui.relay, kind, link.label, [link.detail, when].filter(Boolean).join(", "));
  } else if (state.daemon === "offline" && state.mode === "relay") {
    // Seen from the relay, an offline daemon is one whose link is down: say that, not
    // "Unknown" (the banner above already says the daemon is offline).
    setFact(ui.relay, "bad", "Down", "no link from this daemon");
  } else if (state.daemon === "offline") {
    // Only the daemon knows its link's state, and it does not answer.
    setFact(ui.relay, "neutral", "Not known", "until the daemon answers");
  } else {
    setFact(ui.relay, "neutral", "Checking…");
  }

  setFact(ui.feed, state.feedKind, state.feedLabel);
}

function renderDaemons() {
  const relay = state.mode === "relay";
  ui.daemonsSection.hidden = !relay;
  if (!relay || state.daemons === null) return;
  const daemons = state.daemons.daemons.filter((daemon) => typeof daemon?.daemon_id === "string");
  ui.daemonsEmpty.hidden = daemons.length > 0;
  ui.daemonsList.replaceChildren(...daemons.map(renderDaemon));
}

function renderDaemon(daemon) {
  const id = daemon.daemon_id;
  const shown = id === state.current;
  const href = daemonHref(location.pathname, id);
  const name =
    href === null
      ? el("strong", { className: "row__name", text: id })
      : el("a", {
          className: "row__name",
          text: id,
          attrs: shown ? { href, "aria-current": "page" } : { href },
        });
  // The shown daemon's state comes from ../health and the live feed, which the Connection card
  // shows too; the list (polled less often) could lag behind them for a whole poll interval.
  const known = shown && !state.signedOut && state.daemon !== "unknown";
  const online = known ? state.daemon === "online" : daemon.online === true;
  const item = el("li", { className: "row" }, [
    name,
    badge(online ? "ok" : "bad", online ? "Online" : "Offline"),
  ]);
  if (daemon.default) item.append(badge("neutral", "Default"));
  if (shown) item.append(badge("neutral", "Shown"));
  const details = [];
  if (online && typeof daemon.rtt_ms === "number") details.push(`${Math.round(daemon.rtt_ms)} ms`);
  const version = known && online ? (state.health?.version ?? daemon.version) : daemon.version;
  if (typeof version === "string") details.push(`version ${version}`);
  const since = online ? formatTime(daemon.connected_since) : null;
  if (since !== null) details.push(`connected since ${since.label}`);
  if (details.length > 0) {
    item.append(el("span", { className: "row__detail", text: details.join(" · ") }));
  }
  return item;
}

let bannerKey = "";

function renderBanner() {
  const { parts, key } = bannerContent();
  // Rebuilding identical content would make screen readers announce it again at every poll.
  if (key === bannerKey) return;
  bannerKey = key;
  ui.banner.className = parts.length > 0 ? "banner banner--shown" : "banner";
  ui.banner.replaceChildren(...parts);
}

function bannerContent() {
  if (state.signedOut) {
    return {
      key: "signed-out",
      parts: [
        el("strong", { text: "Your session has ended. " }),
        el("a", { text: "Sign in again", attrs: { href: rootHref(location.pathname) } }),
        ".",
      ],
    };
  }
  if (state.daemon !== "offline") return { key: "", parts: [] };
  const failure = state.failure ?? { code: "", detail: "" };
  const offline = state.mode === "relay" || failure.code === "daemon_offline";
  let headline;
  if (state.mode === "relay" && state.current === null) {
    headline = "No daemon is online for this key.";
  } else if (offline) {
    headline = state.current ? `Daemon ${state.current} is offline.` : "The daemon is offline.";
  } else {
    headline = "The daemon does not answer.";
  }
  const parts = [el("strong", { text: `${headline} ` })];
  // An "offline" answer only restates the headline ("Daemon X is offline."); other failures
  // (a timeout, an HTTP error) say something the headline does not.
  const detail = offline && failure.code === "daemon_offline" ? "" : failure.detail;
  if (detail) parts.push(el("span", { text: `${detail} ` }));
  parts.push("Fix: run ", el("code", { text: "repowire status" }), " on the daemon's machine.");
  const online = (state.daemons?.daemons ?? []).filter(
    (daemon) =>
      daemon?.online === true &&
      daemon.daemon_id !== state.current &&
      daemonHref(location.pathname, daemon.daemon_id) !== null,
  );
  if (state.mode === "relay" && online.length > 0) {
    parts.push(" Online now: ");
    online.forEach((daemon, index) => {
      if (index > 0) parts.push(", ");
      const href = daemonHref(location.pathname, daemon.daemon_id);
      parts.push(el("a", { text: daemon.daemon_id, attrs: { href } }));
    });
    parts.push(".");
  }
  const key = JSON.stringify([headline, detail, online.map((daemon) => daemon.daemon_id)]);
  return { key, parts };
}

function render() {
  renderHeader();
  renderBanner();
  renderStatus();
  renderDaemons();
  renderPeersCount();
}

// ---------------------------------------------------------------------------------------------
// The send form

const fields = { to: ui.to, text: ui.text, from: ui.from };

/** Show the send form's outcome; `code` (an API error code) goes after the words, small. */
function showResult(kind, text, code = "") {
  ui.result.className = `result result--${kind}`;
  ui.result.replaceChildren(text);
  if (code) ui.result.append(" ", el("code", { className: "result__code", text: code }));
}

for (const input of Object.values(fields)) {
  input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
}

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

// The message last sent but not known to be delivered: its form values and its id. Sending the
// same values again (say, after a 503 while the relay was away) reuses the id, so a message that
// did arrive after all is not delivered twice.
let unconfirmed = null;

ui.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (ui.send.disabled) return;
  const values = { to: ui.to.value.trim(), text: ui.text.value, from: ui.from.value.trim() };
  const problem = validateNotify(values);
  if (problem !== null) {
    fields[problem.field].setAttribute("aria-invalid", "true");
    fields[problem.field].focus();
    showResult("error", problem.message);
    return;
  }
  ui.send.disabled = true;
  showResult("pending", `Sending to ${values.to}…`);
  const sent = JSON.stringify(values);
  if (unconfirmed === null || unconfirmed.sent !== sent) {
    unconfirmed = { sent, id: newMessageId() };
  }
  try {
    const answer = await request(apiUrl(ROUTES.notify, location.href), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(notifyBody(values, unconfirmed.id)),
    });
    if (answer.ok && answer.body?.delivered !== false) {
      unconfirmed = null;
      showResult("ok", `Delivered to ${values.to}.`);
      // Only a delivered message is cleared: after an error the text is still there to retry.
      ui.text.value = "";
    } else if (isSignedOut(answer)) {
      signedOut();
      showResult("error", "Not sent: your session has ended. Sign in again, then retry.");
    } else {
      const failure = describeFailure(answer.status, answer.body);
      const verb = answer.ok ? "Not delivered" : "Not sent";
      showResult("error", `${verb}: ${failure.detail}`, failure.code);
      if (answer.status === 503 || answer.status === 0) checkHealth();
    }
  } finally {
    ui.send.disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Start

document.addEventListener("visibilitychange", () => {
  if (document.hidden) return;
  checkHealth();
  loadDaemons();
  if (state.daemon === "online") loadPeers();
});

render();
checkHealth();
loadDaemons();
