"""Two peer trainers for the benchmark suite, written against plain PyTorch and fastai, not autotransfer's search.

Both start from the same bundled EfficientNet-Lite0 ImageNet weights the search uses
(`autotransfer.backbones.get_backbone("efficientnet_lite0")`: only the weights, the layer groups and the
normalisation are taken from autotransfer) and read the data set's own train/val/test folders.

hand (f): the careful hand recipe. The whole network trains: AdamW, head lr 1e-3 and body 1e-4 (weight
    decay 0.01), cosine decay per step, BatchNorm statistics frozen (every BN layer in eval mode; its affine
    weights still train), label smoothing 0.1, random shifts (reflect-pad 1/8 of the side, random crop; no
    flips: letters and digits are not mirror-symmetric), batch 32, 50 epochs. Input: 64 px for images
    smaller than 64 px, else the data's own size capped at 128 px (to keep CPU time sane). Trained on
    train; reports the final model's val and test accuracy.

fastai: fastai's own recipe. `Learner` on the Lite0 body (a Sequential of its groups) plus fastai's
    `create_head` through `add_head` (concat pool, BN, dropout, 512-unit MLP, Kaiming init: exactly what
    `vision_learner` builds), a splitter that puts body and head in two parameter groups so `freeze()` and
    the discriminative `slice` of `fine_tune` work, `aug_transforms()` (fastai's defaults, flips included),
    Adam with fastai's defaults, `train_bn=True`. `lr_find()`'s valley is the base lr; `fine_tune(n)` runs for
    each n in {5, 10, 20} from fresh weights and the n with the best validation accuracy is reported (its
    test accuracy; all three are in `detail`). Same input size as `hand`. The bundled port keeps
    TensorFlow's BatchNorm momentum (0.01 in PyTorch terms); fastai trains BN layers in train mode, which
    with that momentum leaves the running statistics far behind the weights, so the main column
    (`fastai`) sets momentum 0.1 on every BatchNorm and `fastai_bn0.01` keeps 0.01.

    python benchmarks/peers.py hand DATA_DIR [--seed 0] [--epochs 50] [--json out.json]
    python benchmarks/peers.py fastai DATA_DIR [--fastai-epochs 5,10,20]
    python benchmarks/peers.py fastai_bn0.01 DATA_DIR

Each `run(data_dir, seed, ...)` returns dict(test_accuracy, val_accuracy, seconds, detail). fastai is an
optional extra (`pip install -e '.[bench]'`); without it the fastai peers raise `PeerMissing` and the CLI
exits with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BACKBONE = "efficientnet_lite0"
FASTAI_MISSING = "fastai not installed: pip install -e '.[bench]'"
EXIT_MISSING = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class PeerMissing(RuntimeError):
    """A peer's optional dependency is not installed."""


def native_size(data_dir: str | Path) -> int:
    """The shorter side of the first training image."""
    from PIL import Image

    first = next(f for f in sorted(Path(data_dir, "train").rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
    with Image.open(first) as img:
        return min(img.size)


def input_size(data_dir: str | Path) -> int:
    """64 px for images smaller than 64 px, else their own size capped at 128 px."""
    side = native_size(data_dir)
    return 64 if side < 64 else min(side, 128)


def lite0_body(bn_momentum: float | None = None) -> tuple[nn.Sequential, int, tuple, tuple]:
    """The bundled pretrained Lite0 as one Sequential (stem .. 1x1 head conv), its width, mean and std."""
    from autotransfer.backbones import get_backbone

    backbone = get_backbone(BACKBONE)
    body = nn.Sequential(*backbone.groups)
    if bn_momentum is not None:
        for m in body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return body, backbone.channels[-1], backbone.mean, backbone.std


# --- (f) the hand recipe ------------------------------------------------------------------------------


class _Classifier(nn.Module):
    def __init__(self, body: nn.Module, width: int, n_classes: int) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _shift(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` px per image: reflect-pad, then a random crop of the original size."""
    n, _, h, w = x.shape
    padded = F.pad(x, [pad] * 4, mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(norm(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


def run_hand(data_dir: str | Path, seed: int = 0, *, epochs: int = 50, batch_size: int = 32,
             log=print) -> dict:
    """The hand fine-tune (f); see the module docstring."""
    from autotransfer.data import load_data

    start = time.perf_counter()
    torch.manual_seed(seed)
    size = input_size(data_dir)
    data = load_data(str(data_dir), image_size=size, seed=seed)
    body, width, mean, std = lite0_body()
    model = _Classifier(body, width, len(data.classes))
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def norm(u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255.0 - m) / s

    x_train, y_train = data.subset("train")
    optimizer = torch.optim.AdamW([{"params": model.body.parameters(), "lr": 1e-4},
                                   {"params": model.head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(seed)
    pad = max(1, size // 8)
    for epoch in range(epochs):
        model.train()
        for mod in model.modules():  # frozen BatchNorm statistics
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
        order = torch.randperm(len(x_train), generator=g)
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = _shift(norm(x_train[idx]), pad, g)
            loss = loss_fn(model(xb), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log(f"hand: epoch {epoch + 1}/{epochs} train loss {total / count:.4f} "
                f"({time.perf_counter() - start:.0f}s)")
    val = _accuracy(model, *data.subset("val"), norm)
    test = _accuracy(model, *data.subset("test"), norm)
    return dict(test_accuracy=test, val_accuracy=val, seconds=time.perf_counter() - start,
                detail=dict(image_size=size, native_size=native_size(data_dir), epochs=epochs, batch_size=batch_size,
                            train=len(x_train), lr_head=1e-3, lr_body=1e-4, bn="frozen statistics",
                            label_smoothing=0.1, shift_px=pad))


# --- fast.ai ------------------------------------------------------------------------------------------


def _fastai():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fastai.vision.all as fv
    except ImportError:
        raise PeerMissing(FASTAI_MISSING) from None
    return fv


def _fastai_learner(fv, data_dir: Path, size: int, bn_momentum: float, seed: int, workdir: Path):
    fv.set_seed(seed, reproducible=True)
    body, width, mean, std = lite0_body(bn_momentum)
    dls = fv.ImageDataLoaders.from_folder(
        data_dir, train="train", valid="val", item_tfms=fv.Resize(size),
        batch_tfms=[*fv.aug_transforms(), fv.Normalize.from_stats(mean, std)], bs=32, num_workers=0,
        device=torch.device("cpu"))
    model = fv.add_head(body, width, dls.c)  # fastai's create_head + Kaiming init, as vision_learner does

    def splitter(m: nn.Module):
        return fv.L(m[0], m[1]).map(fv.params)

    learn = fv.Learner(dls, model, splitter=splitter, metrics=fv.accuracy, path=workdir,
                       moms=(0.95, 0.85, 0.95))  # vision_learner's defaults (Adam, train_bn=True, wd None)
    learn.freeze()
    return learn


def _quiet(learn):
    stack = contextlib.ExitStack()
    stack.enter_context(learn.no_bar())
    stack.enter_context(learn.no_logging())
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def run_fastai(data_dir: str | Path, seed: int = 0, *, bn_momentum: float = 0.1,
               epoch_choices: tuple[int, ...] = (5, 10, 20), log=print) -> dict:
    """fastai's fine_tune with lr_find's valley, epochs chosen on validation; see the module docstring."""
    fv = _fastai()
    start = time.perf_counter()
    data_dir = Path(data_dir)
    size = input_size(data_dir)
    test_items = fv.get_image_files(data_dir / "test")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fastai-peer-") as tmp:
        learn = _fastai_learner(fv, data_dir, size, bn_momentum, seed, Path(tmp))
        with _quiet(learn):
            suggestion = learn.lr_find(show_plot=False)
        base_lr = float(suggestion.valley)
        log(f"fastai (bn momentum {bn_momentum}): lr_find valley {base_lr:.2e} ({time.perf_counter() - start:.0f}s)")
        for epochs in epoch_choices:
            t0 = time.perf_counter()
            learn = _fastai_learner(fv, data_dir, size, bn_momentum, seed, Path(tmp))
            with _quiet(learn):
                learn.fine_tune(epochs, base_lr=base_lr)
                val = float(learn.validate()[1])
                preds, targets = learn.get_preds(dl=learn.dls.test_dl(test_items, with_labels=True))
            test = float((preds.argmax(1) == targets).float().mean())
            runs[epochs] = dict(val_accuracy=val, test_accuracy=test, seconds=time.perf_counter() - t0)
            log(f"fastai: fine_tune({epochs}) val {val:.4f} test {test:.4f} ({runs[epochs]['seconds']:.0f}s)")
    best = max(epoch_choices, key=lambda e: (runs[e]["val_accuracy"], -e))  # ties: fewer epochs
    return dict(test_accuracy=runs[best]["test_accuracy"], val_accuracy=runs[best]["val_accuracy"],
                seconds=time.perf_counter() - start,
                detail=dict(image_size=size, native_size=native_size(data_dir), bn_momentum=bn_momentum,
                            base_lr=base_lr, epochs=best, freeze_epochs=1, runs={str(k): v for k, v in runs.items()},
                            head="fastai create_head", fastai=_fastai_version()))


def _fastai_version() -> str:
    import fastai

    return fastai.__version__


PEERS = {
    "hand": lambda d, seed, a: run_hand(d, seed, epochs=a.epochs, log=_err),
    "fastai": lambda d, seed, a: run_fastai(d, seed, bn_momentum=0.1, epoch_choices=a.fastai_epochs, log=_err),
    "fastai_bn0.01": lambda d, seed, a: run_fastai(d, seed, bn_momentum=0.01, epoch_choices=a.fastai_epochs,
                                                   log=_err),
}


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch counts, e.g. 5,10,20; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"epoch counts must be at least 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("data", type=Path, help="folder with train/ val/ test/ class folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=50, help="hand: epochs (default: 50)")
    parser.add_argument("--fastai-epochs", type=_epochs_list, default=(5, 10, 20),
                        help="fastai: fine_tune epoch counts to choose from on validation (default: 5,10,20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the result dict here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = PEERS[args.peer](args.data, args.seed, args)
    except PeerMissing as e:
        print(e, file=sys.stderr)
        return EXIT_MISSING
    result["detail"]["threads"] = torch.get_num_threads()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(f"{args.peer} {args.data}: val {result['val_accuracy']:.4f} test {result['test_accuracy']:.4f} "
          f"({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
