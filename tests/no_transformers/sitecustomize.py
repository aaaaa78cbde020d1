"""Loaded (PYTHONPATH) by processes of the test of an install without transformers: hides it, as if absent."""
import sys

sys.modules["transformers"] = None  # import fails, importlib.util.find_spec says None: as when it is not installed
