"""The ``fedkd`` command, for both parties: each command loads only its own side's code.

``fedkd teacher ...`` and ``fedkd train-teacher ...`` are the institution's commands (``fedkd.client.cli``,
``fedkd.client.train``): they never import the coordinator's package. Every other command (``run``, ``distill``,
``hub``, ``certs``, ``simulate``, ``partition``, ``predict``, ``keys``) is the coordinator's (``fedkd.server.cli``),
whose ``--help`` lists them all. Every command reads its arguments before it imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

VERBOSE = ("-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(args) if a not in VERBOSE), None)
    if first is not None and args[first] == "teacher":
        from fedkd.client.flags import teacher_parser

        parsed = teacher_parser().parse_args([a for a in args[:first] if a in VERBOSE] + args[first + 1:])
        from fedkd.client.cli import command  # torch and the host's code, once the flags are read

        return command(parsed)
    if first is not None and args[first] == "train-teacher":
        from fedkd.client.flags import training_parser

        parsed = training_parser().parse_args(args[first + 1:])
        from fedkd.client.train import command as train  # torch and the trainer, once the flags are read

        return train(parsed)
    from fedkd.server.cli import main as coordinator

    return coordinator(args)


if __name__ == "__main__":
    sys.exit(main())
