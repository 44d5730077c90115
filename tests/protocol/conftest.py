"""Hypothesis profiles of the protocol's property tests (``test_properties.py``).

Pick one with the environment variable ``REPOWIRE_HYPOTHESIS_PROFILE``; the default is
``protocol``:

- ``protocol``: the default. The properties together draw over 10,000 examples (about 8,000
  without the one marked ``slow``), and the file still finishes in well under a minute on
  two cores.
- ``protocol-quick``: a tenth of that, for a fast edit loop.
- ``protocol-thorough``: ten times the default, for a soak before a release.

The profiles are registered here and applied per test with ``settings(parent=...)``, not loaded
globally, so they never change the settings of Hypothesis tests elsewhere in the tree.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

#: Examples per unit of weight in the default profile (each property has a weight, see
#: test_properties.py; the weights add up to more than 10).
PROTOCOL_EXAMPLES = 1000

PROFILES = {
    "protocol": PROTOCOL_EXAMPLES,
    "protocol-quick": PROTOCOL_EXAMPLES // 10,
    "protocol-thorough": PROTOCOL_EXAMPLES * 10,
}
for _name, _examples in PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        # A loaded 2-core box must not fail a property on a scheduling hiccup.
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

_selected = os.environ.get("REPOWIRE_HYPOTHESIS_PROFILE", "protocol")
if _selected not in PROFILES:
    raise pytest.UsageError(
        f"REPOWIRE_HYPOTHESIS_PROFILE={_selected!r}: expected one of {', '.join(PROFILES)}"
    )
settings.register_profile("protocol-selected", settings.get_profile(_selected))
