"""Shared test set-up: ``tests/`` on the path.

The suite runs on two workers (``-n 2 --dist loadgroup`` in pyproject.toml) with no groups: each test
is its own unit and goes to whichever worker is free, so the Ray tests' waits overlap the engine
tests' CPU work. Putting the Ray modules into two groups (one per worker, each module's fixtures
started once) made the suite slower: 28:31 against 17:40 in fresh clones today (the grouped run
had a helper's test run beside it for 13 of its minutes, so partly load, but not only).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
