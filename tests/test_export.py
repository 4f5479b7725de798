import numpy as np
import onnx
import pytest
import torch

from autotransfer.errors import ExportError
from autotransfer.export import cpu_session, export_onnx, read_metadata, verify
from autotransfer.model import build_model
from autotransfer.preprocess import NormalisedImages, normalise
from autotransfer.strategy import Strategy


@pytest.mark.parametrize("head", ["linear", "svm", "mlp"])
def test_each_head_exports_with_parity_and_dynamic_batch(head, tiny, digits16, tmp_path):
    s = Strategy(tap=3, freeze=1, head=head, mlp_hidden=32 if head == "mlp" else 0, dropout=0.3, steps=20)
    model = build_model(s, tiny, 10).eval()
    with torch.no_grad():  # non-trivial head statistics
        model.head[0].running_mean.uniform_(-1, 1)
    path = export_onnx(model, tmp_path / "m.onnx", image_size=16, metadata={"class_names": list("0123456789")})
    proto = onnx.load(str(path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value, "batch axis must be symbolic"
    session = cpu_session(path)
    for n in (1, 7):
        x = normalise(digits16.images[:n], tiny.mean, tiny.std)
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)
    assert read_metadata(session)["class_names"] == list("0123456789")


def test_verify_reports_parity_and_accuracy(tiny, digits16, tmp_path):
    model = build_model(Strategy(tap=2, freeze=2), tiny, 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=16, metadata={})
    x, y = digits16.subset("test")
    out = verify(model, path, normalise(x, tiny.mean, tiny.std), y)
    assert out["onnx_max_abs_diff"] < 1e-4 and out["top1_agreement"] == 1.0
    with torch.no_grad():
        expected = (model(normalise(x, tiny.mean, tiny.std)).argmax(1) == y).float().mean().item()
    assert out["test_accuracy"] == pytest.approx(expected)
    with torch.no_grad():
        scale = model(normalise(x, tiny.mean, tiny.std)).abs().max().item()
    assert out["onnx_parity_tolerance"] == pytest.approx(1e-4 + 1e-4 * scale, rel=1e-3)


class _Counted(NormalisedImages):
    """Records how many rows each read normalises."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.reads: list[int] = []

    def __getitem__(self, rows):
        batch = super().__getitem__(rows)
        self.reads.append(len(batch))
        return batch


def test_verify_normalises_the_test_split_a_batch_at_a_time_with_the_same_figures(tiny, digits16, tmp_path):
    model = build_model(Strategy(tap=2, freeze=2), tiny, 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=16, metadata={})
    x, y = digits16.subset("test")
    assert x.untyped_storage().data_ptr() == digits16.images.untyped_storage().data_ptr(), "a view, not a copy"
    whole = verify(model, path, normalise(x, tiny.mean, tiny.std), y, batch_size=16)
    rows = _Counted(x, tiny.mean, tiny.std)
    assert verify(model, path, rows, y, batch_size=16) == whole
    assert sum(rows.reads) == 2 * len(x) and max(rows.reads) == 16, "onnxruntime and PyTorch each read every row once"


def test_verify_fails_loudly_when_onnx_and_torch_disagree(tiny, digits16, tmp_path):
    model = build_model(Strategy(tap=2, freeze=2), tiny, 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=16, metadata={})
    with torch.no_grad():
        model.head[-1].bias.add_(0.01)
    x, y = digits16.subset("test")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify(model, path, normalise(x, tiny.mean, tiny.std), y)
