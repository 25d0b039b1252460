"""A data factory that takes its time, so a test can kill a sweep in the middle (see test_collapse.py)."""

import time

from helpers import tiny_classification


def slow_classification(delay: float = 1.0, **kwargs):
    time.sleep(delay)
    return tiny_classification(**kwargs)
