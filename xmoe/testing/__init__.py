"""Test support shipped with xmoe: the pytest plugin (MPI fixtures) and routing generators."""
