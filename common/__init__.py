"""Words every package of the project shares: the key format and its masking, daemon ids, the
error codes of JSON error answers and their HTTP statuses, the installed version.

A leaf: it imports nothing from the project, and every package may import it (``protocol``
excepted, which stands alone).
"""

from ._errors import HTTP_ERROR_CODES as HTTP_ERROR_CODES
from ._errors import MESH_ERROR_STATUS as MESH_ERROR_STATUS
from ._errors import http_error_code as http_error_code
from ._errors import mesh_error_status as mesh_error_status
from ._errors import reason_phrase as reason_phrase
from ._ids import DAEMON_ID_PATTERN as DAEMON_ID_PATTERN
from ._ids import MAX_DAEMON_ID_LENGTH as MAX_DAEMON_ID_LENGTH
from ._ids import is_daemon_id as is_daemon_id
from ._keys import KEY_PREFIX as KEY_PREFIX
from ._keys import MASK_VISIBLE as MASK_VISIBLE
from ._keys import MAX_SECRET_TEXT_LENGTH as MAX_SECRET_TEXT_LENGTH
from ._keys import SECRET_BYTES as SECRET_BYTES
from ._keys import SECRET_TEXT_LENGTH as SECRET_TEXT_LENGTH
from ._keys import generate_key as generate_key
from ._keys import generate_public_id as generate_public_id
from ._keys import generate_session_id as generate_session_id
from ._keys import hash_secret as hash_secret
from ._keys import looks_like_key as looks_like_key
from ._keys import looks_like_session_id as looks_like_session_id
from ._keys import mask_key as mask_key
from ._version import DISTRIBUTION as DISTRIBUTION
from ._version import package_version as package_version
