"""The configuration file (``<home>/config.yaml``) and the settings resolved from it.

Home directory: ``$REPOWIRE_HOME`` when set, else ``~/.repowire``. The file is YAML::

    daemon:
      host: 127.0.0.1
      port: 8377
      id: laptop-3f9c0a        # generated on first use, then kept
    relay:
      enabled: false
      url: wss://repowire.io
      api_key: rw_...
      ca_file: /path/to/ca.pem # optional: trust a self-signed relay

Every value is resolved with this precedence, highest first:

1. command-line flags (:class:`Overrides`);
2. environment: ``REPOWIRE_RELAY_URL``, ``REPOWIRE_API_KEY``, ``REPOWIRE_RELAY_ENABLED``
   (``1``/``0``/``true``/``false``/``yes``/``no``/``on``/``off``), ``REPOWIRE_DAEMON_PORT``;
   an empty variable counts as unset;
3. the config file;
4. the defaults below.

Reading (:func:`read_settings`) never writes; :func:`load_settings` writes only the daemon id,
on first use. Writes go through :func:`update_config`: a round-trip edit that keeps comments,
key order and keys this package does not know, done under a lock, written to a temporary file
in the same directory and renamed over the old one, with mode 0600 because the file holds an
API key. A malformed file is never rewritten: every function raises :class:`ConfigError` with
one line naming the file and the problem, and leaves the file byte-for-byte as it was.
"""

from ._daemon_id import DAEMON_ID_HOST_PART_MAX as DAEMON_ID_HOST_PART_MAX
from ._daemon_id import DAEMON_ID_RANDOM_BYTES as DAEMON_ID_RANDOM_BYTES
from ._daemon_id import generate_daemon_id as generate_daemon_id
from ._daemon_id import make_daemon_id as make_daemon_id
from ._edit import check_writable as check_writable
from ._edit import ensure_daemon_id as ensure_daemon_id
from ._edit import update_config as update_config
from ._errors import ConfigError as ConfigError
from ._errors import redact_secrets as redact_secrets
from ._file import MAX_CONFIG_BYTES as MAX_CONFIG_BYTES
from ._load import ENV_API_KEY as ENV_API_KEY
from ._load import ENV_DAEMON_PORT as ENV_DAEMON_PORT
from ._load import ENV_RELAY_ENABLED as ENV_RELAY_ENABLED
from ._load import ENV_RELAY_URL as ENV_RELAY_URL
from ._load import load_settings as load_settings
from ._load import read_settings as read_settings
from ._model import DEFAULT_DAEMON_HOST as DEFAULT_DAEMON_HOST
from ._model import DEFAULT_DAEMON_PORT as DEFAULT_DAEMON_PORT
from ._model import DEFAULT_RELAY_URL as DEFAULT_RELAY_URL
from ._model import DaemonConfig as DaemonConfig
from ._model import Overrides as Overrides
from ._model import RelayConfig as RelayConfig
from ._model import Settings as Settings
from ._paths import CONFIG_FILE_NAME as CONFIG_FILE_NAME
from ._paths import ENV_HOME as ENV_HOME
from ._paths import LOCK_FILE_NAME as LOCK_FILE_NAME
from ._paths import config_path as config_path
from ._paths import repowire_home as repowire_home
from ._urls import RELAY_LINK_PATH as RELAY_LINK_PATH
from ._urls import dashboard_url as dashboard_url
from ._urls import http_base as http_base
from ._urls import normalize_relay_url as normalize_relay_url
from ._urls import relay_url_problem as relay_url_problem
