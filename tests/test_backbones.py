import pytest
import torch

from autotransfer.backbones import get_backbone, list_backbones
from autotransfer.errors import ConfigError
from tests.conftest import TINY

PRODUCT_BACKBONES = [n for n in list_backbones() if n != TINY]


def test_registry_lists_required_families():
    required = {"efficientnet_lite0", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small",
                "mobilenet_v3_large", "efficientnet_b0", "vgg16_bn", "convnext_tiny"}
    assert required <= set(list_backbones())


@pytest.mark.parametrize("name", PRODUCT_BACKBONES)
def test_groups_chain_and_channels_match_forward(name):
    backbone = get_backbone(name, "random")
    assert backbone.num_groups == list_backbones()[name][0] == len(backbone.group_names) == len(backbone.channels)
    x = torch.randn(2, 3, 64, 64)
    backbone.groups.eval()
    with torch.no_grad():
        sizes = []
        for group, channels in zip(backbone.groups, backbone.channels, strict=True):
            x = group(x)
            assert x.shape[1] == channels
            sizes.append(x.shape[-1])
    assert sizes == sorted(sizes, reverse=True), "spatial size must never grow from input to output"


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match=r"Unknown backbone 'resnt50'.*resnet50"):
        get_backbone("resnt50")


def test_missing_torchvision_weights_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="never downloads"):
        get_backbone("resnet18")
    assert not any(tmp_path.rglob("*.pth"))


def test_weights_path_must_exist():
    with pytest.raises(ConfigError, match="does not exist"):
        get_backbone("resnet18", "/nonexistent/resnet18.pth")


def test_weights_of_another_backbone_are_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(get_backbone("resnet18", "random").groups.state_dict(), path)
    with pytest.raises(ConfigError, match="does not match backbone 'resnet50'"):
        get_backbone("resnet50", str(path))


def test_torchvision_weights_from_path_are_loaded(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(model.conv1.weight, 0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    backbone = get_backbone("resnet18", str(path))
    assert torch.all(backbone.groups[0][0].weight == 0.125)
    assert backbone.weights_id.startswith("resnet18.pth:")


def _imagenet_top(image: str, k: int) -> list[int]:
    from PIL import Image
    from skimage import data as skdata

    from autotransfer.backbones import Lite0Classifier, load_lite0
    from autotransfer.data import to_rgb_square
    from autotransfer.preprocess import normalise

    backbone, fc = load_lite0()
    model = Lite0Classifier(backbone, fc).eval()
    pixels = to_rgb_square(Image.fromarray(getattr(skdata, image)()), 224)
    x = normalise(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None], backbone.mean, backbone.std)
    with torch.no_grad():
        return model(x).topk(k).indices[0].tolist()


def test_bundled_lite0_weights_are_real_imagenet_weights():
    assert set(_imagenet_top("chelsea", 3)) & {281, 282, 283, 284, 285}, "a cat class must be in the top 3"
    assert _imagenet_top("coffee", 1) == [967], "espresso must be top 1"
