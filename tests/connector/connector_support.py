"""The names tests/cli imports from here, kept until its imports move to
:mod:`tests.support.processes` (where they live now); nothing else imports this module."""

from __future__ import annotations

from tests.support.processes import LOOPBACK as LOOPBACK
from tests.support.processes import ChildProcess as ChildProcess
from tests.support.processes import Cli as Cli
from tests.support.processes import free_port as free_port
from tests.support.processes import start_child as start_child
