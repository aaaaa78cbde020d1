"""`export PATH --out FILE`: the model weights of one checkpoint as one safetensors (or torch.save) file."""
from __future__ import annotations

import os

from ..export import DTYPES, FORMATS, export
from .common import EXIT_OK, UsageError, checkpoint_arg, subparser
from .table import human_bytes

EPILOG = """examples:
  dcp-resume export runs/exp1/step_500 --out model.safetensors
  dcp-resume export runs/exp1/step_500 --out encoder.safetensors --prefix encoder. --dtype bf16
  dcp-resume export "$(dcp-resume latest runs/exp1)" --out model.pt --format torch

Reads only the model's tensors (state entry --state-key, default 'model'), reassembled from the shards of
however many ranks wrote them (DDP, FSDP2), so memory stays at the model's size. Names are plain parameter
names, without 'model.', 'module.', '_orig_mod.' or FSDP prefixes: the file loads with
safetensors.torch.load_file and model.load_state_dict. With --prefix, names are relative to it, so the file
loads into that submodule (model.encoder.load_state_dict); --keep-prefix keeps full names. --dtype casts
floating tensors only. The checkpoint must be complete and pass its content hashes (exit 1 otherwise). FILE
is written atomically (temp file + rename); an existing FILE is replaced only with --force.
"""


def register(sub) -> None:
    p = subparser(sub, "export", "write a checkpoint's model weights to one safetensors (or torch) file", EPILOG)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.safetensors, or .pt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors to this dtype")
    p.add_argument("--prefix", metavar="COMPONENT", help="only keys under this component, e.g. encoder.")
    p.add_argument("--keep-prefix", action="store_true", help="keep the --prefix part of the names")
    p.add_argument("--format", choices=FORMATS,
                   help="default: torch for FILE ending in .pt/.pth/.bin, else safetensors")
    p.add_argument("--state-key", default="model", metavar="NAME",
                   help="the state entry that holds the model (default: model)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(run=run)


def _out_arg(out: str, force: bool) -> str:
    """Local checks of --out before anything is read (the output is always a local file)."""
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a directory; name the file to write, e.g. "
                         f"{os.path.join(out, 'model.safetensors')}")
    if os.path.exists(out) and not force:
        raise UsageError(f"--out {out} already exists; pass --force to replace it, or choose another file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):  # checked before reading gigabytes (access() sees read-only mounts)
        raise UsageError(f"--out {out}: directory {parent} is not writable (read-only filesystem or no "
                         "permission); choose another --out")
    return out


def run(args) -> int:
    path = checkpoint_arg(args.store, args.path)
    out = _out_arg(args.out, args.force)
    fmt = args.format or ("torch" if out.endswith((".pt", ".pth", ".bin")) else "safetensors")
    done = export(path, out, store=args.store, state_key=args.state_key, prefix=args.prefix,
                  keep_prefix=args.keep_prefix, dtype=args.dtype, fmt=fmt)
    print(f"Exported {done.count} tensors ({human_bytes(done.nbytes)}, {', '.join(done.dtypes)}) of step "
          f"{done.step} from {path} to {out} ({fmt})")
    return EXIT_OK
