"""Put on PYTHONPATH, this makes a Python process see none of the packages a gateway or bench
host leaves out (tests/test_architecture.py): importing one fails as if it were not installed."""

import importlib.abc
import sys

ABSENT = {"torch", "transformers", "matplotlib", "redis"}


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent())
