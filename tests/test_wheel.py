"""The package as a user installs it: a wheel (not editable) into a fresh virtual environment.

The repository's ``server/`` and ``client/`` install inside the package (``fedkd.server``, ``fedkd.client``), so
the wheel puts nothing at the top level of site-packages but ``fedkd`` and its metadata. The fresh environment
takes fedkd's dependencies (torch, flwr, ...) from this interpreter's site-packages through a ``.pth`` line,
read after its own, so ``fedkd`` itself can only come from the wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_the_wheel_installs_under_the_fedkd_namespace_and_runs(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # a copy: no build/ left in the tree, none reused
    for part in ("fedkd", "server", "client"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(source)], cwd=tmp_path)
    (wheel,) = dist.glob("fedkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedkd", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                                                + ".dist-info"}
    for module in ("fedkd/server/app.py", "fedkd/client/app.py", "fedkd/coordinator/methods/cudfkd.py",
                   "fedkd/institution/privacy/ledger.py", "fedkd/v1/fedkd_pb2.py"):
        assert module in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, fedkd = venv / "bin" / "python", venv / "bin" / "fedkd"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "fedkd-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))
                  and p.name in ("fedkd", "server", "client")) == ["fedkd"]

    assert "run" in _run([str(fedkd), "--help"], cwd=tmp_path).stdout
    imported = json.loads(_run([str(python), "-c", (
        "import json, sys, fedkd.server.app, fedkd.client.app; "
        "print(json.dumps({'fedkd': fedkd.__file__, 'server': fedkd.server.app.app.__class__.__name__, "
        "'client': fedkd.client.app.app.__class__.__name__, "
        "'top': sorted({m.split('.')[0] for m in sys.modules} & {'server', 'client'})}))")], cwd=tmp_path).stdout)
    assert imported["fedkd"].startswith(str(site))
    assert (imported["server"], imported["client"], imported["top"]) == ("ServerApp", "ClientApp", [])

    out = tmp_path / "run"
    _run([str(fedkd), "run", "--set", "dataset=digits", "--set", "num-clients=2", "--set", "epochs=1",
          "--set", "steps-per-epoch=2", "--set", "student-steps=2", "--set", "teacher-epochs=1",
          "--out", str(out)], cwd=tmp_path, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits" and len(summary["teachers"]) == 2
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0 and (out / "student.pt").is_file()
