"""The coordinator's entry points: its `fedkd` commands (:mod:`server.cli`), the Flower ServerApp, the hub."""
