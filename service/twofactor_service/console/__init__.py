"""The web console: the seed's screens in a browser, served by `twofactor serve` from a process
of its own.

`supervisor.py` (in the gRPC server's process) starts `process.py` and keeps it running. There,
`site.py` serves the page and its committed bundle (built from console/ at the repository's
root) behind `front_door.py`'s limits, and hands every RPC to `bridge.py`, which forwards it, as
gRPC-Web bytes, over a unix socket to the server process's gRPC server, so a browser's call
passes the same call pipeline as any other.
"""
