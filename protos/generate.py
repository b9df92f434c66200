"""Regenerate the Python code for the fedkd.v1 contract: ``python protos/generate.py``.

Writes ``fedkd/v1/fedkd_pb2.py``, ``fedkd_pb2.pyi`` and ``fedkd_pb2_grpc.py``
from ``protos/fedkd/v1/*.proto`` with grpcio-tools (pinned in the ``test``
extra: its bundled protoc must target protobuf 6.x, the range flwr's gRPC
packages accept). ``tests/test_contract.py`` regenerates into a temporary
folder and fails when the committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent


def generate(out_dir: Path) -> list[Path]:
    """Generate into ``out_dir`` (the repository root for the committed code); returns the files written."""
    from grpc_tools import protoc  # a development dependency (the test extra)

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "fedkd").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    return sorted(p for p in (out_dir / "fedkd").rglob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    sys.exit(0)
