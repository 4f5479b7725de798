import numpy as np
import pytest
import torch
from PIL import Image

from autotransfer.data import load_data
from autotransfer.errors import DataError


def _write_images(folder, n, *, mode="RGB", size=(20, 12), value=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = np.full((size[1], size[0], channels), (value + i) % 255, dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode).save(folder / f"img{i}.png")


def test_digits_split_is_stratified_disjoint_and_seeded(digits16):
    d = digits16
    assert d.images.shape == (1797, 3, 16, 16) and d.images.dtype == torch.uint8
    parts = [set(d.split[s].tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 1797 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert abs(len(parts[0]) / 1797 - 0.70) < 0.02 and abs(len(parts[2]) / 1797 - 0.15) < 0.02
    for c in range(10):  # every class present in every split, in proportion
        counts = [int((d.labels[d.split[s]] == c).sum()) for s in ("train", "val", "test")]
        assert min(counts) >= 20
    again = load_data("digits", image_size=16, seed=0)
    assert again.fingerprint == d.fingerprint
    assert load_data("digits", image_size=16, seed=1).fingerprint != d.fingerprint


def test_digits_default_size_is_64():
    assert load_data("digits").image_size == 64


def test_folder_grayscale_and_rgba_become_rgb(tmp_path):
    _write_images(tmp_path / "cats", 5, mode="L", value=10)
    _write_images(tmp_path / "dogs", 5, mode="RGBA", value=100)
    d = load_data(str(tmp_path), image_size=32)
    assert d.classes == ("cats", "dogs")
    assert d.images.shape == (10, 3, 32, 32)
    gray = d.images[d.labels == 0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_presplit_folder_keeps_its_split(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for c in ("a", "b"):
            _write_images(tmp_path / split / c, n)
    d = load_data(str(tmp_path), image_size=16)
    assert [len(d.split[s]) for s in ("train", "val", "test")] == [12, 4, 6]


def test_csv_source(tmp_path):
    _write_images(tmp_path / "imgs", 8)
    rows = ["path,label"] + [f"imgs/img{i}.png,{'odd' if i % 2 else 'even'}" for i in range(8)]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    d = load_data(str(tmp_path / "labels.csv"), image_size=16)
    assert d.classes == ("even", "odd") and len(d.labels) == 8


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "neither a folder"),
        (lambda p: p.mkdir(), "No images found"),
        (lambda p: _write_images(p / "only", 5), "need at least 2"),
        (lambda p: (_write_images(p / "a", 5), _write_images(p / "b", 2)), "Class 'b' has 2 image"),
        (lambda p: (p.parent.mkdir(exist_ok=True), p.with_suffix(".csv").write_text("file,y\nx.png,1\n")),
         "columns 'path' and 'label'"),
        (lambda p: p.with_suffix(".csv").write_text("path,label\nmissing.png,1\n"), "not found"),
    ],
    ids=["missing", "empty", "one-class", "tiny-class", "csv-columns", "csv-unknown-path"],
)
def test_bad_data_is_a_clear_error(tmp_path, setup, match):
    target = tmp_path / "data"
    setup(target)
    source = target.with_suffix(".csv") if target.with_suffix(".csv").exists() else target
    with pytest.raises(DataError, match=match):
        load_data(str(source), image_size=16)


def test_corrupt_image_is_skipped_when_others_remain(tmp_path, caplog):
    _write_images(tmp_path / "a", 5)
    _write_images(tmp_path / "b", 5)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    d = load_data(str(tmp_path), image_size=16)
    assert len(d.labels) == 10
    assert "broken.png" in caplog.text


def test_digits_shifted_is_the_same_digits_inverted():
    plain, shifted = load_data("digits", image_size=32), load_data("digits_shifted", image_size=32)
    assert torch.equal(plain.labels, shifted.labels) and plain.classes == shifted.classes
    assert plain.images.float().mean() < 80 and shifted.images.float().mean() > 170, "dark on light"


@pytest.mark.parametrize("fractions", [(0.70, 0.15, 0.15), (0.1, 0.45, 0.45), (0.98, 0.01, 0.01)])
def test_stratified_split_keeps_every_class_in_every_split(fractions):
    from autotransfer.data import _stratified_split

    counts = [3, 4, 5, 7, 40, 300]  # from the fewest a split allows to a big class
    labels = np.repeat(np.arange(len(counts)), counts)
    split = _stratified_split(labels, [f"c{i}" for i in range(len(counts))], fractions, seed=1)
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(len(labels))), "a partition"
    for s in ("train", "val", "test"):
        assert np.bincount(labels[split[s]], minlength=len(counts)).min() >= 1, f"a class is missing from {s}"
    if fractions == (0.70, 0.15, 0.15):
        assert [int((labels[split["train"]] == c).sum()) for c in range(len(counts))] == [1, 2, 3, 5, 28, 210]


def test_a_three_image_class_lands_in_train_val_and_test(tmp_path):
    _write_images(tmp_path / "big", 30)
    _write_images(tmp_path / "rare", 3, value=100)
    d = load_data(str(tmp_path), image_size=16)
    rare = d.classes.index("rare")
    assert [int((d.labels[d.split[s]] == rare).sum()) for s in ("train", "val", "test")] == [1, 1, 1]


def test_classes_with_fewer_than_three_images_are_one_clear_error(tmp_path):
    _write_images(tmp_path / "a", 6)
    for name, n in (("b", 2), ("c", 1), ("d", 2)):
        _write_images(tmp_path / name, n)
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path), image_size=16)
    message = str(e.value)
    assert message.startswith("Class 'b' has 2 image(s) (and 2 more class(es) with fewer than 3); a train/val/test")
    assert "\n" not in message and "Add images to it or remove the class" in message


def test_labels_follow_the_sorted_class_names(tmp_path):
    names = [f"k{i:03d}" for i in range(40)]
    for i, name in enumerate(reversed(names)):  # created in reverse: the order must not matter
        _write_images(tmp_path / name, 3, value=i)
    d = load_data(str(tmp_path), image_size=16)
    assert d.classes == tuple(names)
    assert torch.equal(torch.bincount(d.labels), torch.full((40,), 3))
    assert all(len(set(d.labels[d.split[s]].tolist())) == 40 for s in ("train", "val", "test"))
