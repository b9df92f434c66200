"""Task cards: declared once, checked field by field; built-in datasets are tasks of their own."""

from __future__ import annotations

import pytest

from fedkd.data import SPECS
from fedkd.task import Task, TaskError, run_task

CARD = """name = "derm7"
classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
input-shape = [3, 64, 64]
mean = [0.76, 0.55, 0.57]
std = [0.14, 0.15, 0.17]
"""


def test_a_task_card_gives_the_run_its_classes_shape_and_normalisation(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(CARD)
    task = Task.from_toml(path)
    assert task.classes[4] == "mel" and task.num_classes == 7 and task.input_shape == (3, 64, 64)
    spec = task.spec
    assert (spec.name, spec.num_classes, spec.channels, spec.image_size) == ("derm7", 7, 3, 64)
    assert spec.mean == (0.76, 0.55, 0.57) and spec.std == (0.14, 0.15, 0.17)
    assert run_task(str(path), "mnist5k") == task
    assert Task.from_mapping(task.to_dict()) == task


def test_a_count_of_classes_names_them_by_index(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('classes = 3\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]\n')
    task = Task.from_toml(path)
    assert task.classes == ("0", "1", "2") and task.name == "t"


def test_built_in_datasets_are_tasks_of_their_own():
    task = run_task("", "digits")
    assert task.spec == SPECS["digits"] and task.classes == tuple(str(c) for c in range(10))


@pytest.mark.parametrize("card,message", [
    ('classes = 3\ninput-shape = [1, 8, 8]\nmean = [0.5]\n', "field 'std' is missing"),
    ('classes = 3\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]\ncolour = 1\n', "unknown field 'colour'"),
    ('classes = "three"\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]\n', "field 'classes' must be a count"),
    ('classes = 1\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]\n', "2 to 100000 classes"),
    ('classes = ["a", "a"]\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]\n', "each once"),
    ('classes = 3\ninput-shape = [1, 8]\nmean = [0.5]\nstd = [0.5]\n', "[channels, height, width]"),
    ('classes = 3\ninput-shape = [1, 8, 18]\nmean = [0.5]\nstd = [0.5]\n', "has side 18; give multiples of 4"),
    ('classes = 3\ninput-shape = [1, 10, 10]\nmean = [0.5]\nstd = [0.5]\n', "multiples of 4"),
    ('classes = 3\ninput-shape = [3, 8, 8]\nmean = [0.5]\nstd = [0.5, 0.5, 0.5]\n', "field 'mean' has 1 values"),
    ('classes = 3\ninput-shape = [1, 8, 8]\nmean = [0.5]\nstd = [0.0]\n', "'std' must be positive"),
    ('classes = 3\ninput-shape = [1.5, 8, 8]\nmean = [0.5]\nstd = [0.5]\n', "must hold integers"),
    ('classes = 3\ninput-shape = [1, 8, 8]\nmean = [nan]\nstd = [0.5]\n', "not finite"),
    ('classes = [3\n', "not valid TOML"),
])
def test_a_bad_task_card_is_refused_naming_the_file_and_the_field(tmp_path, card, message):
    path = tmp_path / "bad.toml"
    path.write_text(card)
    with pytest.raises(TaskError, match="bad.toml") as info:
        Task.from_toml(path)
    assert message in str(info.value)


def test_a_missing_task_card_is_named(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        Task.from_toml(tmp_path / "none.toml")


def _write_pngs(root, counts, size=(10, 12), mode="L"):
    from PIL import Image

    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, size, color=40 * i % 255).save(root / name / f"{i}.png")


def test_an_image_folder_loads_resized_with_labels_in_the_task_s_order(tmp_path):
    task = Task(("zebra", "apple", "mango"), (1, 8, 8), (0.5,), (0.5,))
    _write_pngs(tmp_path / "val", {"apple": 2, "mango": 1, "zebra": 3})
    data = task.load_images(tmp_path / "val")
    assert data.images.shape == (6, 1, 8, 8) and 0.0 <= float(data.images.min()) <= float(data.images.max()) <= 1.0
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 2]  # zebra is the task's class 0, whatever the folder order
    rgb = Task(("a", "b"), (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    _write_pngs(tmp_path / "rgb", {"a": 1, "b": 1}, mode="RGB")
    assert rgb.load_images(tmp_path / "rgb").images.shape == (2, 3, 16, 16)


def test_a_bad_image_folder_is_refused_naming_the_class_or_the_file(tmp_path):
    task = Task(("cat", "dog"), (1, 8, 8), (0.5,), (0.5,))
    _write_pngs(tmp_path / "extra", {"cat": 1, "dog": 1, "cow": 1})
    with pytest.raises(ValueError, match="'cow' name no class of the task"):
        task.load_images(tmp_path / "extra")
    _write_pngs(tmp_path / "short", {"cat": 1})
    with pytest.raises(ValueError, match="no sub-folder for class\\(es\\) 'dog'"):
        task.load_images(tmp_path / "short")
    _write_pngs(tmp_path / "broken", {"cat": 1, "dog": 1})
    (tmp_path / "broken" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png' is not an image PIL can read"):
        task.load_images(tmp_path / "broken")
    from fedkd.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        task.load_images(tmp_path / "nowhere")
