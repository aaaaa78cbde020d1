"""dcp-resume: exact checkpoint/resume for PyTorch training on preemptible compute."""
__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    RankFailureError,
    SaveDirLockedError,
    StorageError,
    UnsafeCheckpointError,
)
from .ddp import InexactResumeWarning, exact_ddp, exact_gradient_sync  # noqa: E402
from .distributed import rank_failures_named  # noqa: E402
from .experiment import ExperimentCheckpointer  # noqa: E402
from .manager import CheckpointManager  # noqa: E402
from .options import CheckpointOptions  # noqa: E402
from .preemption import PREEMPTED_EXIT_CODE, exit_preempted  # noqa: E402
from .rng import RNGState  # noqa: E402
from .sampler import ResumableSampler  # noqa: E402

__all__ = [
    "CheckpointManager", "CheckpointOptions", "ExperimentCheckpointer", "PREEMPTED_EXIT_CODE", "exit_preempted",
    "CheckpointExistsError", "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointSaveError",
    "CorruptCheckpointError", "IncompleteCheckpointError", "RankFailureError", "SaveDirLockedError", "StorageError",
    "UnsafeCheckpointError", "InexactResumeWarning",
    "exact_ddp", "exact_gradient_sync", "rank_failures_named", "ResumableSampler", "RNGState",
    "__version__",
]
