"""The `dcp-resume` console script (see main.py)."""
from .main import main

__all__ = ["main"]
