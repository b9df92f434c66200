"""The coordinator's entry points: the ``fedkd`` command (:mod:`server.cli`)."""
