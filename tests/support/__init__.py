"""Test helpers shared across the test directories.

- :mod:`tests.support.listener`: :class:`LoopbackServer`, a loopback TCP server base.
- :mod:`tests.support.proxy`: :class:`TcpProxy`, a loopback TCP proxy that can black-hole its
  forwarding and kill its connections, and :func:`start_proxy`.
- :mod:`tests.support.websocket`: :func:`open_client_websocket`, a trio-websocket client on a
  stream the helper owns and closes.
"""

from __future__ import annotations

from .listener import LOOPBACK as LOOPBACK
from .listener import LoopbackServer as LoopbackServer
from .proxy import TcpProxy as TcpProxy
from .proxy import start_proxy as start_proxy
from .websocket import WS_CLOSE_TIMEOUT as WS_CLOSE_TIMEOUT
from .websocket import open_client_websocket as open_client_websocket
