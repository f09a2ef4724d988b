"""HiveMind Worker: donate spare compute to the HiveMind distributed computing platform."""

import os
from importlib.metadata import PackageNotFoundError, version

# Tasks are started with fork+exec and never use gRPC in a forked child, so gRPC's fork
# handlers are only noise ("skipping fork() handlers") and risk: run in a child forked while
# gRPC calls are in flight, they crash it before it execs (a root worker's tasks are forked,
# not vforked, to start as nobody). Set, not defaulted: grpc reads this when first imported,
# so this must come before any import of grpc.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

try:
    __version__ = version("hivemind-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
