"""Everything a user points at a save_dir, in one process: discovery, auto-resume load, `dcp-resume ls`,
`latest` and `verify`, then the damaged step_4 named explicitly (load, inspect, export). Prints
'latest <path>', 'loaded <step>', 'explicit refused <error>', '<command> rc <code>'; the test runs it with a
timeout."""
import os
import sys

from common import Tiny

from dcp_resume import CheckpointManager, errors
from dcp_resume.cli import main

save_dir = sys.argv[1]
mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
print("latest", mgr.find_latest_checkpoint(), flush=True)
mgr.load_checkpoint(state={"model": Tiny()})
print("loaded", mgr.loaded_metadata["step"], flush=True)
for command in ("ls", "latest", "verify"):
    print(command, "rc", main([command, save_dir]), flush=True)
damaged = os.path.join(save_dir, "step_4")
try:
    mgr.load_checkpoint(damaged, state={"model": Tiny()})
    print("explicit loaded", flush=True)
except (errors.CorruptCheckpointError, errors.UnsafeCheckpointError, errors.IncompleteCheckpointError,
        errors.CheckpointNotFoundError) as e:
    print("explicit refused", type(e).__name__, flush=True)
print("inspect rc", main(["inspect", damaged]), flush=True)
out = os.path.join(save_dir + ".export", "model.safetensors")
os.makedirs(os.path.dirname(out))
print("export rc", main(["export", damaged, "--out", out]), flush=True)
print("exported", os.path.exists(out), flush=True)
