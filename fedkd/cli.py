"""The ``fedkd`` command, for both parties: each command loads only its own side's code.

``fedkd teacher ...`` and ``fedkd train-teacher ...`` are the institution's commands (``fedkd.client.cli``,
``fedkd.client.train``): they never import the coordinator's package. Every other command (``run``, ``distill``,
``hub``, ``certs``, ``simulate``, ``partition``, ``predict``, ``keys``) is the coordinator's (``fedkd.server.cli``),
whose ``--help`` lists them all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

VERBOSE = ("-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(args) if a not in VERBOSE), None)
    if first is not None and args[first] == "teacher":
        from fedkd.client.cli import main as institution

        return institution([a for a in args[:first] if a in VERBOSE] + args[first + 1:])
    if first is not None and args[first] == "train-teacher":
        from fedkd.client.train import main as train

        return train(args[first + 1:])
    from fedkd.server.cli import main as coordinator

    return coordinator(args)


if __name__ == "__main__":
    sys.exit(main())
