"""
The test suite.

Every property test runs under one hypothesis profile, loaded here so that
each module only says how many examples it wants: derandomized (a CI run
repeats the last one exactly), no per-example deadline (the session and
cluster tests do real work per example on a 2-core machine), and the
too-slow and data-too-large health checks off for the same reason.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "unrealon",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("unrealon")
