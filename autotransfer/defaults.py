"""Defaults shared by the library and the CLI, in a module that imports nothing (so `--help` and `predict`
stay free of torch)."""

# The exported model is the chosen strategy trained this many times on train+val, averaged (see `refit.py`):
# 3 took digits' mean test error over four splits from 1.39 % to 1.02 %, for about 4x one trial's time.
DEFAULT_REFITS = 3
DEFAULT_PATIENCE = 10  # trials without a new leader once validation saturated, then the search stops (saturation.py)

DEVICES = ("auto", "cpu", "cuda")  # where training runs; "auto" takes a CUDA GPU when one is visible

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # the objectives of `--metric` (see `metrics.py`)
IMBALANCE_RATIO = 3.0  # largest train class more than 3x the smallest: the data counts as imbalanced
