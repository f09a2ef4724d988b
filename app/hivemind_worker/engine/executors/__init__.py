"""Executors: how a task runs (Docker, the process sandbox); `choice` picks one for this machine."""
