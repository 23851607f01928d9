"""The benchmarks import this checkout's hypercolumn_ops (as run.py does) and their sibling modules."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
