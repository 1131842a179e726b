"""TwoFactorService: the gRPC service that owns accounts' TOTP secret keys."""

import os

# gRPC's fork handlers (pthread_atfork) exist for children that go on using gRPC after a
# fork. This service only forks to exec at once: pgserver runs pg_ctl, `serve --workers`
# spawns fresh interpreters. With the handlers on, such a fork while a gRPC thread is busy
# (pgserver stopping PostgreSQL at exit) logs a raw "fork_posix.cc … skipping fork()
# handlers" line into the JSON log. gRPC's doc/fork_support.md: set GRPC_ENABLE_FORK_SUPPORT
# to false "whenever a user expects to always call exec immediately following fork". It is
# read when grpc is imported, so it is set here, before any module of ours imports grpc;
# an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
