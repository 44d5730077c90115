// Runs the dashboard's app.js in a simulated page under node and checks what a person sees.
// Usage: node app_scenarios.mjs <directory with index.html, app.js, core.js> <scenario>
// The page is simulated just enough for app.js: elements with text, attributes and children;
// a clock advanced by hand; a scripted server behind fetch; EventSource and WebSocket stand-ins
// whose events the scenario fires. Exits non-zero (with the failed assertion) on a mismatch.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [dir, scenarioName] = process.argv.slice(2);

// ---------------------------------------------------------------------------------------------
// Clock: timers run only when the scenario advances time.

let now = 1_700_000_000_000;
let nextTimer = 1;
const timers = new Map();
globalThis.setTimeout = (fn, ms = 0) => {
  const id = nextTimer++;
  timers.set(id, { at: now + Math.max(0, ms), fn });
  return id;
};
globalThis.clearTimeout = (id) => timers.delete(id);
Date.now = () => now;
Math.random = () => 0.5;

async function settle() {
  for (let i = 0; i < 30; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

async function advance(ms) {
  const end = now + ms;
  for (let guard = 0; guard < 10_000; guard += 1) {
    await settle();
    let due = null;
    for (const [id, timer] of timers) {
      if (timer.at <= end && (due === null || timer.at < timers.get(due).at)) due = id;
    }
    if (due === null) break;
    const timer = timers.get(due);
    timers.delete(due);
    now = Math.max(now, timer.at);
    timer.fn();
  }
  now = end;
  await settle();
}

// ---------------------------------------------------------------------------------------------
// Page

class TextNode {
  constructor(data) {
    this.data = data;
    this.parentNode = null;
  }

  get textContent() {
    return this.data;
  }

  remove() {
    if (this.parentNode !== null) this.parentNode._detach(this);
  }
}

class Element {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.childNodes = [];
    this.parentNode = null;
    this.attributes = new Map();
    this.listeners = new Map();
    this.className = "";
    this.hidden = false;
    this.value = "";
    this.disabled = false;
  }

  get children() {
    return this.childNodes.filter((node) => node instanceof Element);
  }

  get textContent() {
    return this.childNodes.map((node) => node.textContent).join("");
  }

  set textContent(value) {
    const text = String(value);
    if (text === "") this.replaceChildren();
    else this.replaceChildren(text);
  }

  _adopt(node) {
    const adopted = typeof node === "string" ? new TextNode(node) : node;
    adopted.remove();
    adopted.parentNode = this;
    return adopted;
  }

  _detach(node) {
    this.childNodes.splice(this.childNodes.indexOf(node), 1);
    node.parentNode = null;
  }

  append(...nodes) {
    for (const node of nodes) this.childNodes.push(this._adopt(node));
  }

  prepend(...nodes) {
    this.childNodes.unshift(...nodes.map((node) => this._adopt(node)));
  }

  after(...nodes) {
    const parent = this.parentNode;
    const adopted = nodes.map((node) => parent._adopt(node));
    parent.childNodes.splice(parent.childNodes.indexOf(this) + 1, 0, ...adopted);
  }

  remove() {
    if (this.parentNode !== null) this.parentNode._detach(this);
  }

  replaceChildren(...nodes) {
    for (const node of [...this.childNodes]) this._detach(node);
    this.append(...nodes);
  }

  setAttribute(name, value) {
    this.attributes.set(name, String(value));
  }

  getAttribute(name) {
    return this.attributes.get(name) ?? null;
  }

  removeAttribute(name) {
    this.attributes.delete(name);
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  dispatch(type, fields = {}) {
    const event = {
      type,
      defaultPrevented: false,
      preventDefault() {
        this.defaultPrevented = true;
      },
      ...fields,
    };
    for (const listener of this.listeners.get(type) ?? []) listener(event);
    return event;
  }

  focus() {
    document.activeElement = this;
  }

  requestSubmit() {
    this.dispatch("submit");
  }

  find(predicate) {
    for (const child of this.children) {
      if (predicate(child)) return child;
      const found = child.find(predicate);
      if (found !== null) return found;
    }
    return null;
  }
}

const elements = new Map();
const markup = readFileSync(path.join(dir, "index.html"), "utf8");
for (const match of markup.matchAll(/<(\w+)\s([^>]*?\bid="([^"]+)"[^>]*)>/g)) {
  const element = new Element(match[1]);
  element.id = match[3];
  element.hidden = /(?:^|\s)hidden(?:\s|$|=)/.test(match[2]);
  elements.set(match[3], element);
}

globalThis.document = {
  title: "",
  hidden: false,
  activeElement: null,
  getElementById: (id) => elements.get(id) ?? null,
  createElement: (tag) => new Element(tag),
  addEventListener() {},
};

function byId(id) {
  const element = elements.get(id);
  assert.ok(element, `no #${id}`);
  return element;
}

const text = (id) => byId(id).textContent;
const items = (id) => byId(id).children;

// Unexpected errors inside app.js (a poll task that throws) fail the scenario.
const errors = [];
const warnings = [];
console.error = (...args) => errors.push(args.map(String).join(" "));
console.warn = (...args) => warnings.push(args.map(String).join(" "));

// ---------------------------------------------------------------------------------------------
// Network

const server = { routes: new Map(), requests: [] };

function route(method, pathname, handler) {
  server.routes.set(`${method} ${pathname}`, handler);
}

function requests(method, pathname) {
  return server.requests.filter((r) => r.method === method && r.path === pathname);
}

globalThis.fetch = async (url, init = {}) => {
  const target = new URL(url);
  const method = init.method ?? "GET";
  const request = {
    method,
    path: target.pathname,
    query: Object.fromEntries(target.searchParams),
    body: init.body === undefined ? null : JSON.parse(init.body),
    headers: init.headers ?? {},
  };
  server.requests.push(request);
  const handler = server.routes.get(`${method} ${target.pathname}`);
  const [status, body] = handler === undefined ? [404, { error: "not_found" }] : handler(request);
  if (status === 0) throw new TypeError("Failed to fetch");
  return {
    status,
    ok: status >= 200 && status < 300,
    redirected: false,
    headers: { get: (name) => (name.toLowerCase() === "content-type" ? "application/json" : null) },
    json: async () => body,
  };
};

class FakeSource {
  constructor(url) {
    this.url = String(url);
    this.readyState = 0;
    this.listeners = new Map();
    this.closed = false;
    this.constructor.instances.push(this);
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  close() {
    this.closed = true;
    this.readyState = 2;
  }

  emit(type, fields = {}) {
    for (const listener of this.listeners.get(type) ?? []) listener({ type, ...fields });
  }
}

class FakeEventSource extends FakeSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  static instances = [];

  open() {
    this.readyState = 1;
    this.emit("open");
  }

  send(event) {
    this.emit(event.type, { data: JSON.stringify(event) });
  }

  fail(readyState) {
    this.readyState = readyState;
    this.emit("error");
  }
}

class FakeWebSocket extends FakeSource {
  static instances = [];
}

globalThis.EventSource = FakeEventSource;
globalThis.WebSocket = FakeWebSocket;

function lastSource() {
  return FakeEventSource.instances.at(-1);
}

// ---------------------------------------------------------------------------------------------
// Scenarios

const hostile = '<img src=x onerror="alert(1)"> & <b>bold</b>';
const healthy = {
  status: "ok",
  daemon_id: "laptop-1",
  version: "0.1.0",
  relay: { state: "connected" },
};

function eventLog(log) {
  return (request) => {
    const after = Number(request.query.after);
    const limit = Number(request.query.limit);
    return [200, { events: log.filter((e) => e.id > after).slice(0, limit) }];
  };
}

async function start(href) {
  globalThis.location = new URL(href);
  await import(pathToFileURL(path.join(dir, "app.js")).href);
  await advance(0);
}

async function submit({ to, message, from = "" }) {
  byId("notify-to").value = to;
  byId("notify-text").value = message;
  byId("notify-from").value = from;
  byId("notify-form").requestSubmit();
  await advance(0);
}

const scenarios = {
  // Through the relay, on a daemon's page: state, daemons, peers, the live feed, the send form,
  // the daemon going offline and coming back restarted.
  async relay() {
    const base = "/d/laptop-1";
    let health = [200, healthy];
    let log = [
      { id: 1, type: "message", time: 1_700_000_000, data: { from: "a", to: "b", text: hostile } },
      { id: 2, type: "peer_joined", time: 1_700_000_001, data: { name: "alice" } },
    ];
    const daemon = (id, online, more = {}) => ({
      daemon_id: id,
      online,
      connected_since: null,
      rtt_ms: null,
      version: null,
      default: false,
      ...more,
    });
    let daemons = [
      daemon("laptop-1", true, {
        connected_since: 1_700_000_000,
        rtt_ms: 12.4,
        version: "0.1.0",
        default: true,
      }),
      daemon("laptop-2", false),
      daemon("..", true),
    ];
    route("GET", `${base}/health`, () => health);
    route("GET", `${base}/api/v1/daemons`, () => [200, { daemons, current: "laptop-1" }]);
    route("GET", `${base}/peers`, () => [
      200,
      {
        peers: [
          { name: "bob", registered_at: 1_700_000_000, meta: { role: "<b>reviewer</b>" } },
          { name: "alice", registered_at: 1_700_000_001, meta: {} },
        ],
      },
    ]);
    route("GET", `${base}/events`, (request) => eventLog(log)(request));
    route("POST", `${base}/notify`, (request) =>
      request.body.to === "nobody"
        ? [404, { error: "unknown_peer", detail: "No peer named nobody is registered." }]
        : [200, { delivered: true }],
    );

    await start("https://relay.example/d/laptop-1/dashboard/");

    assert.equal(byId("logout-form").hidden, false);
    assert.equal(byId("daemons-section").hidden, false);
    assert.match(text("access-state"), /Through the relay/);
    assert.match(text("daemon-state"), /Online.*laptop-1.*0\.1\.0/);
    assert.match(text("relay-state"), /Connected/);
    assert.equal(text("current-daemon"), "Daemon laptop-1");
    assert.equal(text("banner"), "");

    const [one, two, dots] = items("daemons-list");
    const link1 = one.find((e) => e.tagName === "A");
    assert.equal(link1.getAttribute("href"), "../../laptop-1/dashboard/");
    assert.equal(link1.getAttribute("aria-current"), "page");
    assert.match(one.textContent, /Online.*Default.*Shown.*12 ms/);
    const link2 = two.find((e) => e.tagName === "A");
    assert.equal(link2.getAttribute("href"), "../../laptop-2/dashboard/");
    assert.equal(link2.getAttribute("aria-current"), null);
    assert.match(two.textContent, /Offline/);
    assert.equal(dots.find((e) => e.tagName === "A"), null, "an unsafe id is not linked");

    assert.deepEqual(items("peers-list").map((e) => e.children[0].textContent), ["alice", "bob"]);
    assert.match(items("peers-list")[1].textContent, /role: <b>reviewer<\/b>/);
    assert.deepEqual(items("peer-names").map((e) => e.getAttribute("value")), ["alice", "bob"]);
    assert.equal(text("peers-count"), "(2)");

    // The live feed: EventSource first, then a catch-up of what it may have missed.
    assert.equal(FakeEventSource.instances.length, 1);
    assert.equal(lastSource().url, "https://relay.example/d/laptop-1/events/stream");
    lastSource().open();
    await advance(0);
    assert.match(text("feed-state"), /Live \(server-sent events\)/);
    assert.deepEqual(requests("GET", `${base}/events`).at(-1).query, { after: "0", limit: "200" });
    let shown = items("events-list");
    assert.equal(shown.length, 2);
    assert.match(shown[0].textContent, /peer_joined.*alice joined/);
    const body = shown[1].children.at(-1);
    assert.equal(body.textContent, hostile, "user text is shown as text");
    assert.equal(body.children.length, 0, "user text creates no elements");

    const peerPolls = requests("GET", `${base}/peers`).length;
    lastSource().send({ id: 3, type: "peer_left", time: 1_700_000_002, data: { name: "bob" } });
    lastSource().send(log[1]); // a duplicate is shown once
    log = [...log, { id: 3, type: "peer_left", time: 1_700_000_002, data: { name: "bob" } }];
    await advance(300);
    shown = items("events-list");
    assert.equal(shown.length, 3);
    assert.match(shown[0].textContent, /bob left/);
    assert.equal(text("events-count"), "(3)");
    assert.equal(requests("GET", `${base}/peers`).length, peerPolls + 1, "peers refresh on leave");

    // A stream the daemon ended for falling behind is resumed by the browser, uncounted.
    const sources = FakeEventSource.instances.length;
    for (let drop = 0; drop < 5; drop += 1) {
      lastSource().emit("dropped", { data: "{}" });
      lastSource().fail(FakeEventSource.CONNECTING);
      lastSource().open();
      await advance(0);
    }
    assert.equal(FakeEventSource.instances.length, sources);
    assert.equal(FakeWebSocket.instances.length, 0);

    // The send form: bad input is refused before sending, errors keep the text.
    await submit({ to: "", message: "hello" });
    assert.equal(text("notify-result"), "Enter the peer to send to.");
    assert.equal(byId("notify-to").getAttribute("aria-invalid"), "true");
    assert.equal(document.activeElement, byId("notify-to"));
    assert.equal(requests("POST", `${base}/notify`).length, 0);

    await submit({ to: "nobody", message: "hello" });
    const sent = requests("POST", `${base}/notify`).at(-1);
    const { id: firstId, ...firstBody } = sent.body;
    assert.deepEqual(firstBody, { to: "nobody", text: "hello" });
    assert.match(firstId, /^[0-9a-f]{32}$/);
    assert.equal(sent.headers["Content-Type"], "application/json");
    // The words first; the code after them, in its own small element.
    assert.equal(text("notify-result"), "Not sent: No peer named nobody is registered. unknown_peer");
    const code = byId("notify-result").find((e) => e.tagName === "CODE");
    assert.equal(code.className, "result__code");
    assert.equal(code.textContent, "unknown_peer");
    assert.equal(byId("notify-text").value, "hello");
    assert.equal(byId("notify-send").disabled, false);
    // Sending the kept text again is a retry of the same message: same id, delivered once.
    await submit({ to: "nobody", message: "hello" });
    assert.equal(requests("POST", `${base}/notify`).at(-1).body.id, firstId);

    await submit({ to: " alice@laptop-2 ", message: "hello", from: "me" });
    const { id: otherId, ...otherBody } = requests("POST", `${base}/notify`).at(-1).body;
    assert.deepEqual(otherBody, { to: "alice@laptop-2", text: "hello", from: "me" });
    // Other values are another message, with a new id.
    assert.match(otherId, /^[0-9a-f]{32}$/);
    assert.notEqual(otherId, firstId);
    assert.equal(text("notify-result"), "Delivered to alice@laptop-2.");
    assert.equal(byId("notify-text").value, "");

    // The daemon goes offline: a plain banner with the fix, the feed waits.
    health = [503, { error: "daemon_offline", detail: "laptop-1 is not connected." }];
    daemons = daemons.map((d) => (d.daemon_id === "laptop-2" ? { ...d, online: true } : d));
    const offlineSource = lastSource();
    offlineSource.fail(FakeEventSource.CLOSED);
    await advance(0);
    assert.equal(offlineSource.closed, true);
    // Said once, with the daemon's name (the relay's detail only restates it).
    assert.match(
      text("banner"),
      /^Daemon laptop-1 is offline\. Fix: run repowire status on the daemon's machine\./,
    );
    assert.doesNotMatch(text("banner"), /not connected/);
    assert.match(text("relay-state"), /^Down/);
    // One source of truth: the relay's list (fetched before it noticed) still says online,
    // but the shown daemon's row follows the Connection card.
    assert.match(items("daemons-list")[0].textContent, /^laptop-1Offline/);
    assert.match(text("banner"), /Online now: laptop-2\./);
    const other = byId("banner").find((e) => e.tagName === "A");
    assert.equal(other.getAttribute("href"), "../../laptop-2/dashboard/");
    assert.match(text("daemon-state"), /Offline/);
    assert.match(text("feed-state"), /Waiting for the daemon/);
    assert.equal(text("peers-count"), "(2, last known)");
    await advance(60_000);
    assert.equal(FakeEventSource.instances.length, 1, "no stream is opened while offline");

    // It comes back, restarted: its event ids start over, so the shown events are cleared.
    // The relay's list lags behind (it still says offline); the row follows ../health.
    daemons = daemons.map((d) => (d.daemon_id === "laptop-1" ? { ...d, online: false } : d));
    await advance(15_000);
    assert.match(items("daemons-list")[0].textContent, /^laptop-1Offline/);
    const daemonPolls = requests("GET", `${base}/api/v1/daemons`).length;
    health = [200, healthy];
    const data = { from: "c", text: "after restart" };
    log = [{ id: 1, type: "message", time: 1_700_000_100, data }];
    await advance(5_000);
    assert.equal(text("banner"), "");
    assert.match(text("daemon-state"), /^Online/);
    assert.match(items("daemons-list")[0].textContent, /^laptop-1Online/);
    assert.ok(requests("GET", `${base}/api/v1/daemons`).length > daemonPolls, "list refreshed");
    assert.equal(FakeEventSource.instances.length, 2);
    lastSource().open();
    await advance(0);
    assert.deepEqual(requests("GET", `${base}/events`).at(-2).query, { after: "2", limit: "1" });
    assert.equal(FakeEventSource.instances.length, 3, "a fresh stream, without Last-Event-ID");
    lastSource().open();
    await advance(0);
    shown = items("events-list");
    assert.equal(shown.length, 1);
    assert.match(shown[0].textContent, /after restart/);
    assert.match(text("events-note"), /started over/);
  },

  // Served by the daemon itself: no relay parts; EventSource failing falls back to the
  // WebSocket, then to polling.
  async local() {
    const data = { from: "x", to: "y", text: "hi" };
    const event = { id: 7, type: "message", time: 1_700_000_000, data };
    let log = [event];
    route("GET", "/health", () => [
      200,
      { ...healthy, relay: { state: "down", last_error: "invalid key", last_error_at: 1_700_000_000 } },
    ]);
    route("GET", "/peers", () => [200, { peers: [] }]);
    route("GET", "/events", (request) => eventLog(log)(request));

    await start("http://localhost:48377/dashboard/");
    assert.equal(byId("logout-form").hidden, true);
    assert.equal(byId("daemons-section").hidden, true);
    assert.match(text("access-state"), /Local/);
    assert.match(text("relay-state"), /^Downinvalid key, at \S/);
    assert.equal(byId("peers-empty").hidden, false);
    assert.equal(requests("GET", "/api/v1/daemons").length, 1);

    // The stream never opens: the first attempt times out, the others fail outright
    // (one while the browser would retry by itself, one for good).
    assert.equal(FakeEventSource.instances.length, 1);
    await advance(10_000);
    assert.match(text("feed-state"), /Reconnecting/);
    await advance(500); // the retry delay after a first failure, with Math.random() = 0.5
    assert.equal(FakeEventSource.instances.length, 2);
    lastSource().fail(FakeEventSource.CONNECTING);
    lastSource().fail(FakeEventSource.CLOSED);
    await advance(0);
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.equal(FakeWebSocket.instances[0].url, "ws://localhost:48377/ws");
    assert.equal(FakeEventSource.instances.every((s) => s.closed), true);

    const socket = FakeWebSocket.instances[0];
    socket.emit("open");
    await advance(0);
    assert.match(text("feed-state"), /Live \(WebSocket\)/);
    socket.emit("message", { data: JSON.stringify({ type: "event", event }) });
    socket.emit("message", { data: "not json" });
    socket.emit("message", { data: JSON.stringify({ type: "result", delivered: true }) });
    await advance(0);
    assert.equal(items("events-list").length, 1);
    assert.match(items("events-list")[0].textContent, /x → y.*hi/);
    assert.deepEqual(warnings, ["ignored a feed message that is not JSON"]);

    // The WebSocket keeps dropping too: poll ../events, from the last id seen.
    socket.emit("close");
    for (let attempt = 0; attempt < 2; attempt += 1) {
      await advance(30_000);
      FakeWebSocket.instances.at(-1).emit("close");
    }
    await advance(0);
    assert.match(text("feed-state"), /Polling every 5 s/);
    log = [event, { id: 8, type: "peer_joined", time: 1_700_000_001, data: { name: "z" } }];
    await advance(5_000);
    assert.deepEqual(requests("GET", "/events").at(-1).query, { after: "7", limit: "200" });
    assert.equal(items("events-list").length, 2);
    assert.match(items("events-list")[0].textContent, /z joined/);
    await advance(5_000);
    assert.deepEqual(requests("GET", "/events").at(-1).query, { after: "8", limit: "200" });
    assert.equal(requests("GET", "/api/v1/daemons").length, 1, "not asked again once local");
  },

  // The relay's root page when no daemon is online, then the session ending.
  async root() {
    let daemonsAnswer = [200, { daemons: [], current: null }];
    let health = [503, { error: "daemon_offline", detail: "No daemon is connected for this key." }];
    route("GET", "/api/v1/daemons", () => daemonsAnswer);
    route("GET", "/health", () => health);

    await start("https://relay.example/dashboard/");
    assert.equal(text("current-daemon"), "No daemon selected");
    assert.match(
      text("banner"),
      /^No daemon is online for this key\. Fix: run repowire status on the daemon's machine\.$/,
    );
    assert.equal(byId("daemons-empty").hidden, false);
    assert.equal(FakeEventSource.instances.length, 0);

    daemonsAnswer = [401, { error: "unauthorized", detail: "Sign in first." }];
    health = [401, { error: "unauthorized", detail: "Sign in first." }];
    await advance(15_000);
    assert.match(text("banner"), /^Your session has ended\. Sign in again\.$/);
    assert.equal(byId("banner").find((e) => e.tagName === "A").getAttribute("href"), "../");
  },
};

const scenario = scenarios[scenarioName];
assert.ok(scenario, `unknown scenario ${scenarioName}`);
await scenario();
assert.deepEqual(errors, [], "app.js logged errors");
console.log(`${scenarioName}: ok`);
process.exit(0);
