"""What a checkpoint holds, from its metadata alone (no tensor is loaded): `dcp-resume inspect`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

# config.json keys worth a line in `inspect` when present (the rest is in --json)
CONFIG_HIGHLIGHTS = ("model", "model_name", "compression", "dataset", "samples", "epochs", "max_steps",
                     "batch_size", "lr", "learning_rate", "seed", "fsdp", "save_every", "keep_last_n")


@dataclass
class Item:
    """One leaf of the saved state: a tensor (shape, dtype, its bytes in memory) or a pickled value (None,
    None, the bytes it takes in the shard files)."""

    key: str
    shape: list[int] | None
    dtype: str | None
    nbytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": "tensor" if self.shape is not None else "value", "shape": self.shape,
                "dtype": self.dtype, "bytes": self.nbytes}


def items(meta: Metadata) -> list[Item]:
    """Every saved leaf under its flattened DCP key (e.g. `model.encoder.pos`), in key order."""
    stored: dict[str, int] = {}
    for index, where in meta.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + where.length
    out = []
    for key, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for n in md.size:
                numel *= n
            out.append(Item(key, list(md.size), str(md.properties.dtype).removeprefix("torch."),
                            numel * md.properties.dtype.itemsize))
        else:
            out.append(Item(key, None, None, stored.get(key, 0)))
    return sorted(out, key=lambda i: _natural(i.key))


def _natural(key: str) -> list[tuple[int, int, str]]:
    """layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


@dataclass
class Node:
    """A group of keys sharing a dotted prefix, with totals; `item` is set on leaves."""

    name: str  # the last part of the prefix
    children: dict[str, "Node"] = field(default_factory=dict)
    item: Item | None = None
    count: int = 0  # leaves below (1 for a leaf)
    nbytes: int = 0


def key_tree(leaves: list[Item]) -> Node:
    """The keys as a tree split on dots: model -> encoder -> layers -> ... with leaf counts and bytes."""
    root = Node("")
    for leaf in leaves:
        node = root
        for part in leaf.key.split("."):
            node.count += 1
            node.nbytes += leaf.nbytes
            node = node.children.setdefault(part, Node(part))
        node.count += 1
        node.nbytes += leaf.nbytes
        node.item = leaf
    return root
