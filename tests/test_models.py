import pytest
import torch

from fedkd.coordinator.generator import Generator
from fedkd.models import average_weights, build_model, count_parameters


@pytest.mark.parametrize("name,channels,size", [
    ("lenet5", 1, 28), ("lenet5-half", 1, 28), ("lenet5", 1, 8), ("cnn", 3, 32),
    ("resnet18", 3, 32), ("resnet34", 1, 28), ("wrn-16-1", 3, 32), ("wrn-16-2", 1, 8),
])
def test_models_map_images_to_logits(name, channels, size):
    model = build_model(name, num_classes=7, channels=channels, image_size=size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_half_is_smaller_and_unknown_names_list_valid_ones():
    full = build_model("lenet5", num_classes=10, channels=1, image_size=28)
    half = build_model("lenet5-half", num_classes=10, channels=1, image_size=28)
    assert count_parameters(half) < count_parameters(full) / 2
    with pytest.raises(KeyError, match="valid names: lenet5, lenet5-half, cnn"):
        build_model("vgg11", num_classes=10, channels=3, image_size=32)
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn-15-2", num_classes=10, channels=3, image_size=32)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (8, 1)])
def test_generator_output_shape_and_range(size, channels):
    gen = Generator(latent_dim=16, width=8, channels=channels, image_size=size)
    with torch.no_grad():
        x = gen(gen.sample_latent(3))
    assert x.shape == (3, channels, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_fedavg_is_the_elementwise_mean():
    a = build_model("lenet5-half", num_classes=10, channels=1, image_size=8)
    b = build_model("lenet5-half", num_classes=10, channels=1, image_size=8)
    avg = average_weights([a, b])
    key = "classifier.1.weight"
    torch.testing.assert_close(avg[key], (a.state_dict()[key] + b.state_dict()[key]) / 2)
    with pytest.raises(ValueError, match="one architecture"):
        average_weights([a, build_model("cnn", num_classes=10, channels=1, image_size=8)])
