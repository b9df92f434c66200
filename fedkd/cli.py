"""The ``fedkd`` command, for both parties: each command loads only its own side's code.

``fedkd teacher ...`` and ``fedkd train-teacher ...`` are the institution's commands (``fedkd.client.cli``,
``fedkd.client.train``): they never import the coordinator's package. Every other command (``run``, ``distill``,
``hub``, ``certs``, ``simulate``, ``partition``, ``predict``, ``keys``) is the coordinator's (``fedkd.server.cli``),
whose ``--help`` lists them all. Every command reads its arguments before it imports torch.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

VERBOSE = ("-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in VERBOSE for a in args):
        # gRPC's C core prints its own lines (a failed TLS handshake, ...) to stderr; fedkd explains each failure
        # in one line of its own, and -v brings them back
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    first = next((i for i, a in enumerate(args) if a not in VERBOSE), None)
    if first is not None and args[first] == "teacher":
        from fedkd.client.flags import LOG_FORMAT, teacher_parser

        parsed = teacher_parser().parse_args([a for a in args[:first] if a in VERBOSE] + args[first + 1:])
        # the operator's log, set up before a library imported below (Opacus) sets up its own
        logging.basicConfig(level=logging.DEBUG if parsed.verbose else logging.INFO, format=LOG_FORMAT)
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
