"""The web console: the seed's screens in a browser, served by `twofactor serve`.

`site.py` serves the page and its committed bundle (built from console/ at the repository's
root) and hands every RPC to `bridge.py`, which forwards it, as gRPC-Web bytes, to this very
process's gRPC server, so a browser's call passes the same call pipeline as any other.
"""
