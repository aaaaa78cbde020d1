"""`inspect PATH [--json]`: a checkpoint's metadata, config highlights and state keys, no tensor loaded."""
from __future__ import annotations

import json
import os

from .. import dcp_io, inspection, layout
from ..storage import Storage
from .common import EXIT_OK, checkpoint_arg, subparser
from .table import human_bytes, render, utc_time

EPILOG = """examples:
  dcp-resume inspect runs/exp1/step_500
  dcp-resume inspect runs/exp1/step_500 --depth 9      every key
  dcp-resume inspect runs/exp1/step_500 --json         everything, every key, for scripts

The state tree comes from DCP's index (state/.metadata, read with a restricted unpickler): full (unsharded)
shapes, dtypes and bytes in memory for tensors; bytes stored for other values. Nothing is loaded.
"""
SMALL_GROUP = 8  # a group of at most this many leaves (no subgroups) is always shown whole


def register(sub) -> None:
    p = subparser(sub, "inspect", "show a checkpoint's metadata, config and state keys (shapes, dtypes, bytes)",
                  EPILOG)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print everything (every key) as JSON")
    p.add_argument("--depth", type=int, default=2, metavar="N",
                   help=f"expand the key tree N levels (default 2); a group of at most {SMALL_GROUP} plain keys "
                        "always expands")
    p.set_defaults(run=run)


def _config(store: Storage, path: str) -> dict | None:
    try:
        config = store.read_json(os.path.join(path, layout.CONFIG_FILE))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _highlights(config: dict) -> str:
    scalars = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))}
    keys = [k for k in inspection.CONFIG_HIGHLIGHTS if k in scalars] or list(scalars)[:10]
    return " ".join(f"{k}={scalars[k]}" for k in keys)


def _number(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _summary(path: str, meta: dict, listed: int, listed_bytes: int, config: dict | None) -> list[str]:
    metrics = " ".join(f"{k}={_number(v)}" for k, v in (meta.get("metrics") or {}).items()) or "-"
    return [
        f"{Storage.basename(path)}: {meta.get('kind')} checkpoint at step {meta.get('step')}, "
        f"epoch {meta.get('epoch')} ({path})",
        f"  time         {utc_time(meta.get('timestamp'))} UTC",
        f"  world size   {meta.get('world_size')}",
        f"  is_best      {bool(meta.get('is_best'))}; best_metric {_number(meta.get('best_metric'))}",
        f"  metrics      {metrics}",
        f"  written by   torch {meta.get('torch_version', '?')}, dcp-resume {meta.get('dcp_resume_version', '?')} "
        f"(format {meta.get('format_version')})",
        f"  files        {listed} listed in metadata.json, {human_bytes(listed_bytes)}",
        f"  config.json  {_highlights(config) if config else '(none)'}",
    ]


def _tree_rows(node: inspection.Node, depth: int, max_depth: int, indent: str, rows: list) -> None:
    for child in node.children.values():
        name = child.name
        while child.item is None and len(child.children) == 1:  # one-child chains on one line: layers.0
            child = next(iter(child.children.values()))
            name += "." + child.name
        if child.item is not None:
            it = child.item
            rows.append([indent + name, str(it.shape) if it.shape is not None else "-", it.dtype or "value",
                         human_bytes(it.nbytes)])
            continue
        rows.append([indent + name + "/", f"{child.count} keys", "", human_bytes(child.nbytes)])
        flat_and_small = child.count <= SMALL_GROUP and all(c.item is not None for c in child.children.values())
        if depth + 1 < max_depth or flat_and_small:
            _tree_rows(child, depth + 1, max_depth, indent + "  ", rows)


def run(args) -> int:
    store = args.store
    path = checkpoint_arg(store, args.path)
    info = layout.inspect_dir(store, path)
    files = info.meta.get("files") if isinstance(info.meta.get("files"), dict) else {}
    listed_bytes = layout.listed_bytes(files)
    config = _config(store, path)
    items = inspection.items(dcp_io.read_metadata(store, os.path.join(path, layout.STATE_DIR)))
    if args.json:
        print(json.dumps({"path": path, "complete": info.complete, "reason": info.reason, "metadata": info.meta,
                          "files": {"count": len(files), "bytes": listed_bytes}, "config": config,
                          "state": [i.as_dict() for i in items]}, indent=2, default=str))
        return EXIT_OK
    if info.meta:
        lines = _summary(path, info.meta, len(files), listed_bytes, config)
    else:
        lines = [f"{Storage.basename(path)}: uncommitted checkpoint ({path})"]
    if not info.complete:
        lines.insert(1, f"  INCOMPLETE   {info.reason}")
    tree = inspection.key_tree(items)
    rows: list[list[str]] = []
    _tree_rows(tree, 0, args.depth, "", rows)
    lines += ["", f"state: {tree.count} keys, {human_bytes(tree.nbytes)} (from state/.metadata; nothing loaded)"]
    lines += ["  " + line for line in render(["KEY", "SHAPE", "DTYPE", "BYTES"], rows, right={3})]
    print("\n".join(lines))
    return EXIT_OK
