"""Peak memory of the export's test-split check: the split normalised as floats at once, against a batch at a time.

    python benchmarks/export_memory.py [--images 1000] [--size 224]

The export runs the test split through onnxruntime and PyTorch (`export.verify`, and again per precision variant).
Each side runs in a subprocess of its own, so its `ru_maxrss` is that side alone: uint8 test images of `--size` px
(random pixels: memory does not depend on them), a model of the bundled Lite0's first two groups with a linear
head (the check's memory is the split's, not the model's), exported to ONNX, then `verify` on

  whole     `preprocess.normalise` of the whole split (float32, 4x the uint8 size), as the export did before
  batched   `preprocess.NormalisedImages` of it: each batch is normalised when it is run

Last line: `whole_mib=<peak RSS> batched_mib=<peak RSS> saved_mib=<difference> split_float_mib=<the split as floats>`.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _side(mode: str, images: int, size: int) -> None:
    import torch

    from autotransfer.backbones import get_backbone
    from autotransfer.export import export_onnx, verify
    from autotransfer.model import build_model
    from autotransfer.preprocess import NormalisedImages, normalise
    from autotransfer.strategy import Strategy

    backbone = get_backbone("efficientnet_lite0")
    model = build_model(Strategy(tap=2, freeze=2), backbone, 10).eval()
    x = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (images,))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", image_size=size, metadata={})
        rows = normalise(x, backbone.mean, backbone.std) if mode == "whole" else NormalisedImages(x, backbone.mean,
                                                                                                     backbone.std)
        verify(model, path, rows, y)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--side", choices=("whole", "batched"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        _side(args.side, args.images, args.size)
        return 0
    peak = {}
    for side in ("whole", "batched"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--images", str(args.images), "--size",
                              str(args.size)], cwd=REPO, capture_output=True, text=True, check=True)
        peak[side] = float(out.stdout.split()[-1])
        print(f"{side:8s} peak RSS {peak[side]:,.0f} MiB", flush=True)
    split = args.images * 3 * args.size * args.size * 4 / 2**20
    print(f"whole_mib={peak['whole']:.0f} batched_mib={peak['batched']:.0f} "
          f"saved_mib={peak['whole'] - peak['batched']:.0f} split_float_mib={split:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
