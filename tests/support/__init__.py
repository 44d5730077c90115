"""The test harness every suite uses (each module one job).

Servers and stacks in-process (trio, 127.0.0.1, port 0):

- :mod:`tests.support.relays`: the one way to run a relay for a test (:func:`start_relay`,
  :class:`RelayRunner` restartable on the same port, :func:`running_relay` with a nursery for
  its links, the ``stacks`` factory), with test settings and keys and sessions minted directly.
- :mod:`tests.support.daemons`: a daemon app under hypercorn, :class:`LoopbackMesh`.
- :mod:`tests.support.stack`: relay, daemons and their real connectors, each part restartable.
- :mod:`tests.support.stand_in` and :mod:`tests.support.scripted`: a connector stand-in whose
  streams the test answers (HTTP with h11, WebSocket with wsproto).
- :mod:`tests.support.links`: a daemon link spoken by hand (handshake headers, raw frames).
- :mod:`tests.support.fake_relay`: a WebSocket endpoint standing in for a relay.
- :mod:`tests.support.fake_http`: a scripted HTTP server (plain or TLS), self-signed certificates.
- :mod:`tests.support.listener`, :mod:`tests.support.proxy`: a loopback server base; a TCP proxy
  that can black-hole or go silent.

Clients and checks:

- :mod:`tests.support.clients`: one-shot HTTP exchanges, SSE, WebSockets, HTTP over a stream.
- :mod:`tests.support.http_client`: a keep-alive HTTP/1.1 client (tests and benchmarks).
- :mod:`tests.support.websocket`: the trio-websocket client the others build on.
- :mod:`tests.support.sessions`: the relay's sign-in form and its cookie.
- :mod:`tests.support.waiting`: :func:`eventually` and :func:`poll`, bounded polling.
- :mod:`tests.support.leaks`: nothing shaped like an API key in a text.
- :mod:`tests.support.stats`: percentiles and a summary of durations.

Processes:

- :mod:`tests.support.processes`: ``python -m repowire`` as child processes (a temporary
  ``REPOWIRE_HOME``, output in files), ``relay start`` restartable on its port.
- :mod:`tests.support.lab` and :mod:`tests.support.fault_daemon`: the processes of an
  end-to-end test, and a scripted daemon process with the real connector.
- :mod:`tests.support.blocking_processes`: the same for blocking tests (Playwright).
- :mod:`tests.support.hostile`, :mod:`tests.support.hostile_link`,
  :mod:`tests.support.hostile_scenarios`: the hostile-connector fuzzer.
- :mod:`tests.support.redis_server`, :mod:`tests.support.redis_fixtures`: Redis for tests.
- :mod:`tests.support.system`: optional system parts, skipped (or failed) where missing.
"""

from __future__ import annotations

from .listener import LOOPBACK as LOOPBACK
from .listener import LoopbackServer as LoopbackServer
from .proxy import TcpProxy as TcpProxy
from .proxy import start_proxy as start_proxy
from .websocket import WS_CLOSE_TIMEOUT as WS_CLOSE_TIMEOUT
from .websocket import open_client_websocket as open_client_websocket
