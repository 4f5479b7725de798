"""Memory and disk bounded by settings: streamed decoding, the cache's stored boundaries, --cache-disk, reuse."""

import gc
import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.cli import main
from autotransfer.data import _stratified_split, load_data
from autotransfer.errors import ConfigError
from autotransfer.features import ActivationCache
from autotransfer.images import open_image
from autotransfer.rowfiles import open_rows
from autotransfer.strategy import SearchSpace, Strategy
from autotransfer.study import StudyConfig, default_storage, run_study
from autotransfer.trainer import train_trial
from tests.conftest import TINY

FINE_TUNE = dict(head="linear", pool="avgmax", lr=0.005, lr_ratio=0.1, steps=20)


def _photos(root, n=12):
    """Two classes of JPEGs and PNGs of several sizes, and one file that does not decode."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "b" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    return root


def _before(root, size, seed=0):
    """Pixels and fingerprint the way load_data made them before streaming: stack, then hash, listing order."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    decoded, names = [], []
    for f in files:
        try:
            decoded.append(open_image(f, size))
            names.append(f.parent.name)
        except OSError:
            continue
    images = np.stack(decoded).transpose(0, 3, 1, 2).copy()
    labels = np.array([("a", "b").index(n) for n in names], dtype=np.int64)
    split = _stratified_split(labels, ("a", "b"), (0.70, 0.15, 0.15), seed)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    for s in ("train", "val", "test"):
        h.update(split[s].astype(np.int64).tobytes())
    return images, labels, split, h.hexdigest()[:16]


def test_digits_keep_the_fingerprint_they_had_before_streaming():
    assert load_data("digits", image_size=16, seed=0).fingerprint == "b7691dfeaa5b90cf"


@pytest.mark.parametrize("memory_limit", [None, 1000], ids=["in-memory", "memory-mapped"])
def test_decoding_into_the_preallocated_array_gives_the_same_pixels_and_fingerprint(tmp_path, memory_limit):
    root = _photos(tmp_path / "photos")
    images, labels, split, fingerprint = _before(root, 32)
    orphan = tmp_path / "spill" / ".images-999999999-0000.npy"  # left by a killed process
    orphan.parent.mkdir()
    orphan.write_bytes(b"")
    data = load_data(str(root), image_size=32, memory_limit=memory_limit, spill=tmp_path / "spill")
    assert data.fingerprint == fingerprint
    assert (data.images_file is not None) == (memory_limit is not None)
    order = np.concatenate([split[s] for s in ("train", "val", "test")])
    assert np.array_equal(data.images.numpy(), images[order]), "rows are the decoded pixels, in split order"
    assert np.array_equal(data.labels.numpy(), labels[order])
    assert [len(data.split[s]) for s in ("train", "val", "test")] == [len(split[s]) for s in ("train", "val", "test")]
    assert torch.equal(torch.cat([data.split[s] for s in ("train", "val", "test")]), torch.arange(len(order)))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files[int(data.source_index[0])].parent.name == ("a", "b")[int(data.labels[0])]
    assert "zz_broken.jpg" not in {files[i].name for i in data.source_index.tolist()}
    if memory_limit is not None:
        path = data.images_file
        assert path.parent == tmp_path / "spill" and path.is_file() and not orphan.exists()
        copy = pickle.loads(pickle.dumps(data))  # how a worker process receives it: the file's name, no pixels
        assert len(pickle.dumps(data)) < images.nbytes / 2 and torch.equal(copy.images, data.images)
        del data, copy
        gc.collect()
        assert not path.exists(), "the memory-mapped file goes with its data"


def test_a_tiny_memory_limit_puts_the_cache_on_disk_with_only_the_boundaries_trials_start_from(tiny, digits16,
                                                                                             tmp_path):
    n = len(digits16.labels)
    cache = ActivationCache(tiny, digits16, folder=tmp_path / "wide", memory_limit=1)
    cache.load()
    assert cache.storage == "disk" and cache.stored == (1, 2), "boundary 3 (the last group's output) only pooled"
    folder = next((tmp_path / "wide").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["b1.npy", "b2.npy", "meta.json", "p1.npy", "p2.npy", "p3.npy"]
    payload = {p.name: open_rows(p).nbytes for p in folder.glob("*.npy")}
    assert payload == {"b1.npy": n * 8 * 8 * 8 * 2, "b2.npy": n * 16 * 4 * 4 * 2,  # float16 activations
                       "p1.npy": n * 16 * 4, "p2.npy": n * 32 * 4, "p3.npy": n * 48 * 4}  # float32 avg + max
    header = 128  # .npy header of version 1.0
    assert sum(p.stat().st_size for p in folder.glob("*.npy")) == sum(payload.values()) + 5 * header

    narrow = ActivationCache(tiny, digits16, folder=tmp_path / "narrow", memory_limit=1)
    narrow.use_space(SearchSpace(num_groups=3, min_tap=3, max_tap=3, max_trainable=1))  # freeze 2 only
    assert narrow.start_boundary(2) == 2 and narrow.start_boundary(1) == 0 and narrow.stored == (2,)
    assert sorted(p.name for p in next((tmp_path / "narrow").iterdir()).glob("b*.npy")) == ["b2.npy"]


def test_cache_disk_too_small_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, tiny, digits16):
    out = tmp_path / "out"
    code = main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "1", "--cache-disk", "1M",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--cache-disk" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    message = r"needs 6\.0M on disk .* over --cache-disk 1000B; pass --cache-disk 6\.0M or more"
    with pytest.raises(ConfigError, match=message):
        ActivationCache(tiny, digits16, folder=tmp_path / "cache", disk_limit=1000).load()
    with pytest.raises(ConfigError, match="Decoding 1797 images at 16px"):
        load_data("digits", image_size=16, memory_limit=1000, disk_limit=1000, spill=tmp_path / "spill")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "no staging folder, no partial file"


def test_a_resumed_study_and_a_narrower_cache_reuse_the_first_pass(tmp_path, tiny, digits16):
    config = dict(study_name="t", storage=default_storage(tmp_path), out=tmp_path, max_steps=20)
    cold = ActivationCache(tiny, digits16, folder=tmp_path / "cache", memory_limit=1)
    run_study(StudyConfig(budget=3, **config), tiny, cold)
    assert cold.seconds > 0 and not cold.loaded_from_disk
    warm = ActivationCache(tiny, digits16, folder=tmp_path / "cache", memory_limit=1)
    study = run_study(StudyConfig(budget=4, **config), tiny, warm)
    assert len(study.trials) == 4 and warm.loaded_from_disk and warm.seconds == 0 and warm.stored == cold.stored
    assert len(list((tmp_path / "cache").iterdir())) == 1

    narrow = ActivationCache(tiny, digits16, folder=tmp_path / "cache", memory_limit=1)
    narrow.use_space(SearchSpace(num_groups=3, min_tap=3, max_tap=3, max_trainable=1))
    s = Strategy(tap=3, freeze=2, **FINE_TUNE)
    assert train_trial(s, tiny, narrow).history == train_trial(s, tiny, cold).history
    assert narrow.loaded_from_disk, "a cache that stores more boundaries than needed serves a narrower space"


def _wide_backbone() -> Backbone:
    """Group 1 has 16 channels at full resolution: more values per image than the image's 3."""
    torch.manual_seed(0)
    groups = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()),
                            nn.Sequential(nn.Conv2d(16, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
                            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())])
    return Backbone(name="wide_test_cnn", groups=groups, group_names=("w1", "w2", "w3"), channels=(16, 8, 8),
                    mean=(0.5,) * 3, std=(0.5,) * 3, weights_id="wide-seed0")


def test_a_boundary_larger_than_the_image_is_recomputed_from_the_images(digits16):
    wide = _wide_backbone()
    cache = ActivationCache(wide, digits16)
    assert cache.candidates() == (2,) and cache.start_boundary(1) == 0 and cache.start_boundary(2) == 2
    stored = ActivationCache(wide, digits16, store=(1, 2))  # the same trial from a stored boundary 1
    s = Strategy(tap=3, freeze=1, **FINE_TUNE)
    a, b = train_trial(s, wide, cache), train_trial(s, wide, stored)
    assert abs(a.val_accuracy - b.val_accuracy) <= 2 / len(digits16.split["val"])
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-3), "frozen group 1 run on each batch = stored boundary"


def test_rows_are_streamed_permuted_in_place_and_mapped_back(tmp_path):
    from autotransfer.rowfiles import RowWriter, permute_file_rows, permute_rows, release

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    order = rng.permutation(45)  # the last 5 rows were never written (skipped inputs): zeros
    writer = RowWriter(tmp_path / "a.npy", rows.shape, np.uint8)
    for i in range(45):
        writer.write(rows[i:i + 1])
    writer.close(rows=45)
    assert np.array_equal(np.load(tmp_path / "a.npy")[:45], rows[:45]), "a plain .npy file"
    permute_file_rows(tmp_path / "a.npy", order)
    mapped = open_rows(tmp_path / "a.npy")
    assert np.array_equal(mapped[:45], rows[order]) and not mapped[45:].any()
    release(mapped)
    assert np.array_equal(mapped[:45], rows[order]), "released pages are read again from the file"
    in_memory = rows[:45].copy()
    permute_rows(lambda i: in_memory[i], in_memory.__setitem__, order)
    assert np.array_equal(in_memory, rows[order])


def test_the_decoding_and_the_pass_show_progress(tiny, capsys, monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS", "1")
    monkeypatch.setenv("AUTOTRANSFER_PROGRESS_INTERVAL", "0")
    data = load_data("digits", image_size=16)
    ActivationCache(tiny, data, batch_size=512).load()
    err = capsys.readouterr().err.splitlines()
    decoding = [line for line in err if line.startswith("decoding: ")]
    assert decoding[0].startswith("decoding: 1/1797 images") and len(decoding) == 1796, "a line per image but the last"
    passes = [line.split(" images")[0] for line in err if line.startswith("activation pass: ")]
    assert passes == ["activation pass: 512/1797", "activation pass: 1024/1797", "activation pass: 1536/1797"]


def test_no_grad_batches_shrink_for_large_rows_and_keep_small_ones_whole():
    """A forward batch of 256 images at 224 px peaked at 3.7 GiB on Lite0: large rows go in smaller batches."""
    from autotransfer.preprocess import EVAL_BATCH_VALUES, rows_per_batch

    assert rows_per_batch((3, 64, 64)) == 256, "digits at 64 px: batches as before"
    assert rows_per_batch((3, 224, 224)) == 64 and rows_per_batch((3, 448, 448)) == 16
    assert rows_per_batch((1280,)) == 256 and rows_per_batch((3, 224, 224), most=32) == 32
    assert rows_per_batch((EVAL_BATCH_VALUES * 2,)) == 1, "never an empty batch"
