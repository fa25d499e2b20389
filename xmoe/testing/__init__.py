"""Test support shipped with xmoe: the pytest plugin (multi-rank tests, fixtures), the
routing cases and the checks against the NumPy reference. The library never imports it."""
