"""The pinned torch/torchvision pair must import together and run torchvision's compiled ops."""

import torch
import torchvision


def test_torchvision_compiled_ops_work_with_this_torch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_opacus_and_flower_import():
    import flwr
    import opacus

    assert opacus.__version__.startswith("1.6")
    assert tuple(int(p) for p in flwr.__version__.split(".")[:2]) >= (1, 41)
