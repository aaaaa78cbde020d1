"""The reference trainer's frozen LMs come from transformers, a dependency of this package; where it is missing
anyway (an install with --no-deps, or uninstalled since), the trainer says how to get it in one line and exits 2."""
from __future__ import annotations

import importlib.util
import os
import sys

INSTALL = "pip install 'transformers>=4.50' (a dependency of dcp-resume: pip install -e . installs it)"


def require_transformers(program: str) -> None:
    """Exit 2 with one line (on rank 0 only: one line per job, not per process) unless transformers imports."""
    if importlib.util.find_spec("transformers") is not None:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {program} needs transformers for its frozen LMs, which this install lacks: {INSTALL}",
              file=sys.stderr)
    sys.exit(2)
