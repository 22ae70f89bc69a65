"""Test configuration: eight CPU devices for the multi-device tests.

XLA reads XLA_FLAGS once, when jax initializes its backends, so this runs before
any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
