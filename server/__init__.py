"""The coordinator's entry points: its `fedkd` commands (:mod:`fedkd.server.cli`), the Flower ServerApp, the hub."""
