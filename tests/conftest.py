"""Shared test set-up: ``tests/`` on the path.

The suite runs on two workers (``-n 2 --dist loadgroup`` in pyproject.toml) with no groups: each test
is its own unit and goes to whichever worker is free, so the Ray tests' waits overlap the engine
tests' CPU work. Putting the Ray modules into two groups (one per worker, each module's fixtures
started once) made the suite slower: 28:31 against 17:40 in fresh clones today (the grouped run
had a helper's test run beside it for 13 of its minutes, so partly load, but not only).

Each worker computes on one thread: two workers already fill two cores, and torch's default of one
intra-op thread per core makes OpenMP's threads spin against the other worker's and the Ray
processes'. A 200-step float64 pack test took 20 s in a whole run against 0.8 s alone; beside two
busy loops it takes 6.0 s on two threads and 1.2 s on one. Results do not depend on it: every test
compares the pack with models trained in the same process.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
