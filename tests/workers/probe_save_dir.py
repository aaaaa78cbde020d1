"""Everything a user points at a save_dir, in one process: discovery, auto-resume load, `dcp-resume ls` and
`latest`. Prints 'latest <path>', 'loaded <step>', '<command> rc <code>'; the test runs it with a timeout."""
import sys

from common import Tiny

from dcp_resume import CheckpointManager
from dcp_resume.cli import main

save_dir = sys.argv[1]
mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
print("latest", mgr.find_latest_checkpoint(), flush=True)
mgr.load_checkpoint(state={"model": Tiny()})
print("loaded", mgr.loaded_metadata["step"], flush=True)
for command in ("ls", "latest"):
    print(command, "rc", main([command, save_dir]), flush=True)
