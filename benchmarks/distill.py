"""The distilled student against the refit ensemble it learns from: test accuracy, file size, latency.

    python benchmarks/distill.py [--data digits digits_shifted] [--refit 3] [--max-steps N] [--longer 2] [--each]

Per data set (Lite0 at the product's resolution, split seed 0): the prior's first fine-tuning strategy with
the data's step ladder (or `--max-steps`, as `search` takes it) is refit `--refit` times on train+val (the
default export), then distilled as the export does (`autotransfer.distill.distil`: the recipe chosen on
validation, the student trained on train+val); `--each` also trains every candidate recipe's student on
train+val and prints its test accuracy (what the choice could have had). Side by side on the test split,
through PyTorch: one member (the ensemble's first), the ensemble, the student; and two controls that say where
a gain comes from: a student trained `--longer` times the steps with the chosen recipe, and a plain member
(no teacher) trained as long (`--longer 0`: no controls). Then both shipped candidates are exported to ONNX:
file size, and onnxruntime CPU latency at batch 64 (median of `--repeats`).

Last line: student_gap=<worst ensemble - student test accuracy, points> size_ratio=<student / ensemble file>
latency_ratio=<student / ensemble, batch 64> (worst over data sets). Target: gap <= 0.5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from autotransfer.backbones import get_backbone  # noqa: E402
from autotransfer.data import load_data  # noqa: E402
from autotransfer.device import configure_threads  # noqa: E402
from autotransfer.distill import CANDIDATES, SoftTargets, distil, held_out_accuracy  # noqa: E402
from autotransfer.export import export_onnx  # noqa: E402
from autotransfer.features import TRAIN_AND_VAL, ActivationCache  # noqa: E402
from autotransfer.preprocess import normalise  # noqa: E402
from autotransfer.prior import build_prior  # noqa: E402
from autotransfer.refit import refit, refit_schedule  # noqa: E402
from autotransfer.resolution import choose_resolution  # noqa: E402
from autotransfer.runtime import physical_cores, session_options  # noqa: E402
from autotransfer.trainer import train_trial  # noqa: E402
from benchmarks.onnx_latency import median_ms  # noqa: E402


def first_fine_tune(cache: ActivationCache, max_steps: int | None):
    prior = build_prior(cache, max_steps=max_steps)
    return next(s for s in prior.first_strategies if s.trains_backbone)


def latency_ms(path: Path, x: np.ndarray, repeats: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(threads=physical_cores()),
                                   providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(x[:64])
    return median_ms(lambda: session.run(["logits"], {"input": batch}), repeats)


def one(name: str, args: argparse.Namespace) -> dict:
    backbone = get_backbone("efficientnet_lite0")
    data = choose_resolution(load_data(name, seed=0), lambda size: load_data(name, image_size=size, seed=0),
                             backbone)[0]
    cache = ActivationCache(backbone, data)
    strategy = first_fine_tune(cache, args.max_steps)
    x, y = data.subset("test")
    x = normalise(x, backbone.mean, backbone.std)
    start = time.perf_counter()
    ensemble = refit(strategy, backbone, cache, members=args.refit).model.eval()
    refit_s = time.perf_counter() - start
    with torch.no_grad():
        member = float((ensemble.tails[0](ensemble.trunk(x)).argmax(1) == y).float().mean())
    start = time.perf_counter()
    student = distil(strategy, ensemble, backbone, cache)
    distil_s = time.perf_counter() - start
    controls = {"student_longer": None, "plain_longer": None}
    if args.longer:
        schedule = refit_schedule(strategy, cache)
        longer = dataclasses.replace(schedule, steps=args.longer * schedule.steps)
        soft = SoftTargets.of(ensemble, student.recipe)
        for key, loss in (("student_longer", soft), ("plain_longer", None)):
            controls[key] = held_out_accuracy(train_trial(longer, backbone, cache, fit_split=TRAIN_AND_VAL,
                                                          soft_loss=loss).model, x, y)
    row = {"data": name, "images": len(data.labels), "strategy": strategy.describe(backbone.group_names),
           "member": member, "ensemble": held_out_accuracy(ensemble, x, y),
           "student": held_out_accuracy(student.model, x, y), "recipe": student.recipe.name,
           "candidates_val": student.candidates,
           "candidates_kl": {k: round(v, 4) for k, v in student.teacher_kl.items()},
           "candidates_test": _each(args, strategy, ensemble, backbone, cache, x, y),
           **controls, "refit_s": refit_s, "distil_s": distil_s}
    meta = {"class_names": list(data.classes)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, model in (("ensemble", ensemble), ("student", student.model)):
            path = export_onnx(model, Path(tmp) / f"{kind}.onnx", image_size=data.image_size, metadata=meta)
            row[f"{kind}_bytes"] = path.stat().st_size
            row[f"{kind}_ms"] = latency_ms(path, x.numpy(), args.repeats)
    return row


def _each(args, strategy, ensemble, backbone, cache, x, y) -> dict[str, float] | None:
    """Test accuracy of every candidate recipe's student trained on train+val (`--each`), else None."""
    if not args.each:
        return None
    return {r.name: held_out_accuracy(distil(strategy, ensemble, backbone, cache, candidates=(r,)).model, x, y)
            for r in CANDIDATES}


def _controls(r: dict, longer: int) -> str:
    if r["student_longer"] is None:
        return ""
    return f"; {longer}x steps: student {r['student_longer']:.4f}, plain member {r['plain_longer']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "digits_shifted"])
    parser.add_argument("--refit", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=None, help="fine-tune steps (default: the data's ladder)")
    parser.add_argument("--longer", type=int, default=2, help="steps of the two controls, x the refit schedule")
    parser.add_argument("--each", action="store_true", help="also test every candidate recipe's student")
    args = parser.parse_args()
    configure_threads()
    rows = []
    for name in args.data:
        r = one(name, args)
        rows.append(r)
        print(f"{name} ({r['images']} images; {r['strategy']}): test member {r['member']:.4f}, ensemble of "
              f"{args.refit} {r['ensemble']:.4f}, student {r['student']:.4f} ({r['recipe']}; validation "
              f"{r['candidates_val']}, KL to teacher {r['candidates_kl']}; test {r['candidates_test']})"
              f"{_controls(r, args.longer)}. ONNX "
              f"{r['student_bytes'] / 1e6:.1f} "
              f"vs {r['ensemble_bytes'] / 1e6:.1f} MB, batch 64 {r['student_ms']:.1f} vs {r['ensemble_ms']:.1f} ms. "
              f"refit {r['refit_s']:.0f}s, distil {r['distil_s']:.0f}s", flush=True)
    gap = max(100 * (r["ensemble"] - r["student"]) for r in rows)
    size = max(r["student_bytes"] / r["ensemble_bytes"] for r in rows)
    latency = max(r["student_ms"] / r["ensemble_ms"] for r in rows)
    print(f"student_gap={gap:.2f} size_ratio={size:.2f} latency_ratio={latency:.2f}")


if __name__ == "__main__":
    main()
