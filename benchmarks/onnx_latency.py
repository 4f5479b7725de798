"""Latency of an exported model: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, side by side.

    python benchmarks/onnx_latency.py [--model studies/digits/best/model.onnx] [--repeats 30]

The PyTorch side is the same trained model: refit again from the recorded strategy and seeds (the default
export), or rebuilt from the study's checkpoint next to `best/` (`--refit 0`); without
`--model` it takes studies/digits/best/model.onnx when present, else exports the bundled Lite0 with a quick
linear head on digits. int8 is made fresh (calibrated on training images) and checked on the test split.
CPU: batch 1 and 64, median of `--repeats` timed runs after warm-up, the same thread count for both
frameworks; onnxruntime both with its default SessionOptions ("untuned") and with full graph optimisation and
one intra-op thread per core ("tuned"). On a GPU machine also PyTorch CUDA vs onnxruntime CUDA (and TensorRT).
Last line: fp32_ratio=<ort/torch> int8_ratio=<ort int8/torch> int8_agreement=<top-1 vs fp32>, CPU batch 64, tuned.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from autotransfer.backbones import get_backbone  # noqa: E402
from autotransfer.data import load_data  # noqa: E402
from autotransfer.distill import Recipe, distil  # noqa: E402
from autotransfer.export import export_onnx, read_metadata  # noqa: E402
from autotransfer.features import ActivationCache  # noqa: E402
from autotransfer.model import build_model  # noqa: E402
from autotransfer.precision import check_variant, make_variant  # noqa: E402
from autotransfer.preprocess import normalise  # noqa: E402
from autotransfer.refit import refit  # noqa: E402
from autotransfer.runtime import physical_cores, session_options  # noqa: E402
from autotransfer.strategy import Strategy  # noqa: E402
from autotransfer.trainer import train_trial  # noqa: E402

BATCHES = (1, 64)
DEFAULT_MODEL = Path("studies/digits/best/model.onnx")


def median_ms(fn: Callable[[], object], repeats: int, *, warmup: int = 3,
              sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def torch_model_for(model_path: Path):
    """(torch model, metadata) of an exported model: refit again (deterministic), or from its study's checkpoint."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    if meta.get("refits"):  # trained on train+val by `refit`: the same seeds give the same members
        strategy = Strategy.from_dict(meta["strategy"])
        name = json.loads((model_path.parent / "metrics.json").read_text())["data"]
        backbone = get_backbone(meta["backbone"])
        data = load_data(name, image_size=meta["input_size"][-1], seed=strategy.seed)
        cache = ActivationCache(backbone, data)
        model = refit(strategy, backbone, cache, members=meta["refits"]).model.eval()
        if meta.get("distilled"):  # the student of that ensemble, with the recorded recipe
            recipe = (Recipe.from_dict(meta["distilled"]),)
            model = distil(strategy, model, backbone, cache, candidates=recipe).model
        return model.eval(), meta
    number = meta["optuna_trial_number"]
    checkpoint = model_path.resolve().parent.parent / "checkpoints" / f"trial_{number}.pt"
    if not checkpoint.is_file():
        sys.exit(f"No checkpoint {checkpoint} for the PyTorch side; pass a --model inside its study folder.")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    backbone = get_backbone(meta["backbone"])
    model = build_model(Strategy.from_dict(saved["strategy"]), backbone, len(meta["class_names"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), meta


def quick_model(folder: Path) -> tuple[Path, torch.nn.Module]:
    """Bundled Lite0, frozen, with a linear head fitted on digits at 64 px (a minute or two on 2 cores)."""
    data, backbone = load_data("digits", seed=0), get_backbone("efficientnet_lite0")
    strategy = Strategy(tap=backbone.num_groups, freeze=backbone.num_groups)
    model = train_trial(strategy, backbone, ActivationCache(backbone, data)).model.eval()
    meta = {"class_names": list(data.classes), "input_size": [3, 64, 64], "mean": list(backbone.mean),
            "std": list(backbone.std), "backbone": backbone.name, "data": "digits"}
    return export_onnx(model, folder / "model.onnx", image_size=64, metadata=meta), model


def cpu_rows(model, fp32: Path, int8: Path, x: np.ndarray, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    untuned = ort.SessionOptions()
    untuned.log_severity_level = 3
    tuned, cpu = session_options(threads=threads), ["CPUExecutionProvider"]
    sessions = {
        "ort fp32 untuned": ort.InferenceSession(str(fp32), untuned, providers=cpu),
        "ort fp32": ort.InferenceSession(str(fp32), tuned, providers=cpu),
        "ort int8 untuned": ort.InferenceSession(str(int8), untuned, providers=cpu),
        "ort int8": ort.InferenceSession(str(int8), tuned, providers=cpu),
    }
    rows = []
    for n in BATCHES:
        xb = np.ascontiguousarray(x[:n])
        xt = torch.from_numpy(xb)
        with torch.inference_mode():
            ms = median_ms(lambda xt=xt: model(xt), repeats)
        rows.append({"device": "cpu", "runtime": "torch eager fp32", "batch": n, "ms": ms})
        for name, s in sessions.items():
            rows.append({"device": "cpu", "runtime": name, "batch": n,
                         "ms": median_ms(lambda s=s, xb=xb: s.run(["logits"], {"input": xb}), repeats)})
    return rows


def gpu_rows(model, fp32: Path, x: np.ndarray, repeats: int) -> list[dict]:
    """PyTorch eager on CUDA vs onnxruntime CUDA/TensorRT, inputs and outputs kept on the GPU (IOBinding)."""
    rows = []
    gpu_model = model.cuda()
    sync = torch.cuda.synchronize
    for n in BATCHES:
        xt = torch.from_numpy(np.ascontiguousarray(x[:n])).cuda()
        with torch.inference_mode():
            rows.append({"device": "cuda", "runtime": "torch eager fp32", "batch": n,
                         "ms": median_ms(lambda xt=xt: gpu_model(xt), repeats, warmup=10, sync=sync)})
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
    for provider in providers:
        session = ort.InferenceSession(str(fp32), session_options(), providers=[provider, "CPUExecutionProvider"])
        if session.get_providers()[0] != provider:
            print(f"{provider} did not start; skipped", file=sys.stderr)
            continue
        for n in BATCHES:
            xt = torch.from_numpy(np.ascontiguousarray(x[:n])).cuda()
            binding = session.io_binding()
            binding.bind_input("input", "cuda", 0, np.float32, list(xt.shape), xt.data_ptr())
            binding.bind_output("logits", "cuda")
            rows.append({"device": "cuda", "runtime": f"ort {provider.removesuffix('ExecutionProvider')} fp32",
                         "batch": n, "ms": median_ms(lambda s=session, b=binding: s.run_with_iobinding(b), repeats,
                                                     warmup=10, sync=sync)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help=f"exported model.onnx (default: {DEFAULT_MODEL})")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per cell; the median is reported")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="CPU threads for both frameworks")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnx_latency_"))
    path = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    if path is None:
        print("no --model and no studies/digits/best/model.onnx: exporting Lite0 + a linear head ...", file=sys.stderr)
        path, model = quick_model(work)
        meta = read_metadata(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    else:
        model, meta = torch_model_for(path)
    size = int(meta["input_size"][-1])
    metrics = path.parent / "metrics.json"
    data_name = json.loads(metrics.read_text())["data"] if metrics.is_file() else meta.get("data", "digits")
    data = load_data(data_name, image_size=size, seed=0)
    x_test, y_test = data.subset("test")
    x = normalise(x_test, tuple(meta["mean"]), tuple(meta["std"])).numpy()
    with torch.inference_mode():
        ref = torch.cat([model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()
    fp32_session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    got = np.concatenate([fp32_session.run(["logits"], {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    parity = float(np.abs(ref - got).max())

    fp32 = work / "model.onnx"
    if path.resolve() != fp32.resolve():
        fp32.write_bytes(path.read_bytes())
    x_train, _ = data.subset("train")
    pick = np.sort(np.random.default_rng(0).permutation(len(x_train))[:256])
    x_val, _ = data.subset("val")  # int8 keeps convs in float until it agrees with fp32 on these (precision.py)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("autotransfer.precision").setLevel(logging.INFO)
    int8 = make_variant(fp32, "int8", normalise(x_train[pick], tuple(meta["mean"]), tuple(meta["std"])).numpy(),
                        normalise(x_val, tuple(meta["mean"]), tuple(meta["std"])).numpy())
    check = check_variant(int8, fp32, x, y_test.numpy())

    rows = cpu_rows(model, fp32, int8, x, args.repeats, args.threads)
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        rows += gpu_rows(model, fp32, x, args.repeats)

    print(f"model {path} ({meta.get('backbone')}, {size}px, {len(meta['class_names'])} classes); "
          f"{args.threads} threads; torch {torch.__version__}, onnxruntime {ort.__version__}; median of {args.repeats}")
    print(f"fp32 parity on {len(x)} test images: max |ort - torch| logit = {parity:.2e}; int8 test accuracy "
          f"{check['test_accuracy']:.4f} (fp32 {check['test_accuracy'] + check['accuracy_drop']:.4f}), top-1 "
          f"agreement {check['top1_agreement']:.4f}")
    base = {(r["device"], r["batch"]): r["ms"] for r in rows if r["runtime"] == "torch eager fp32"}
    print("\n| device | runtime | batch | median ms | images/s | vs torch |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["ms"] / base[(r["device"], r["batch"])]
        print(f"| {r['device']} | {r['runtime']} | {r['batch']} | {r['ms']:.2f} | {1000 * r['batch'] / r['ms']:.0f} | "
              f"{ratio:.3f} |")
    cell = {(r["device"], r["runtime"], r["batch"]): r["ms"] for r in rows}
    cuda = cell.get(("cuda", "ort CUDA fp32", 64))
    if cuda:
        print(f"\ncuda throughput onnxruntime/torch at batch 64: {cell[('cuda', 'torch eager fp32', 64)] / cuda:.2f}x")
    print(f"\nfp32_ratio={cell[('cpu', 'ort fp32', 64)] / base[('cpu', 64)]:.3f} "
          f"int8_ratio={cell[('cpu', 'ort int8', 64)] / base[('cpu', 64)]:.3f} "
          f"int8_agreement={check['top1_agreement']:.4f}")


if __name__ == "__main__":
    main()
