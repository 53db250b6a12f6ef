"""A quiet terminal: library chatter filtered unless ``--verbose``, and no progress-bar debris in log files.

Lightning's tips and "GPU available" lines, deprecation warnings from the libraries under us, DataLoader
worker-count advice and Weights & Biases banners say nothing about the user's run; the errors, warnings about
their data and the closing summary lines do. Called once by the dispatcher for every ``features`` and ``mil``
command; environment variables carry the same choice into worker and child processes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_FLAG = "--verbose"
# Library warnings that are advice to library users, not news about this run.
CHATTER = (
    r".*does not have many workers.*",  # Lightning: DataLoader worker-count advice
    r".*worker processes in total.*",  # torch: suggested max number of workers
    r".*Consider setting `persistent_workers=True`.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*exists and is not empty.*",  # Lightning: checkpoint folder reused on resume
    r".*Checkpoint directory .* exists.*",
)


def quiet_terminal(argv: list[str]) -> list[str]:
    """Filter library chatter unless ``--verbose`` is in ``argv``; returns ``argv`` without that flag."""
    verbose = VERBOSE_FLAG in argv or os.environ.get("HNM_VERBOSE", "") not in {"", "0"}
    argv = [token for token in argv if token != VERBOSE_FLAG]
    if verbose:
        os.environ["HNM_VERBOSE"] = "1"
        return argv
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in CHATTER:
        warnings.filterwarnings("ignore", message=message)
    # Child processes (DataLoader workers started by spawn, `mil hnm` stages) inherit the same filters.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    logging.disable(logging.INFO)  # Lightning's tips, "Seed set", "GPU available" are INFO records
    os.environ.setdefault("WANDB_SILENT", "true")
    if not sys.stderr.isatty():  # a log file: no carriage-return progress bars, no ANSI cursor moves
        os.environ.setdefault("TQDM_DISABLE", "1")
    return argv
