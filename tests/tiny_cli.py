"""`python -m tests.tiny_cli search ...`: the real CLI in a subprocess, with the tiny test backbone registered.

With AUTOTRANSFER_TEST_TRIAL_SECONDS set, every trial first sleeps that long (while running and sending
heartbeats), so a test can kill or interrupt the process in the middle of a trial.
"""

import os
import sys
import time

import autotransfer.study as study_module
import tests.conftest  # noqa: F401 - registers tiny_test_cnn (also in spawned --workers processes)
from autotransfer.cli import main

_delay = float(os.environ.get("AUTOTRANSFER_TEST_TRIAL_SECONDS", "0"))
if _delay > 0:
    _train_trial = study_module.train_trial

    def _slow_train_trial(*args, **kwargs):
        time.sleep(_delay)
        return _train_trial(*args, **kwargs)

    study_module.train_trial = _slow_train_trial

if __name__ == "__main__":
    sys.exit(main())
