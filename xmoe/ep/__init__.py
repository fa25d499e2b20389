"""The host side of each communication protocol, one module a mode."""
