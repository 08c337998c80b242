"""nswrap: run an unmodified UDP/TCP server so that it answers every uplink from the address asked."""

__version__ = "0.2.0"
