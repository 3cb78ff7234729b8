"""Read W&B's offline run files (``DIR/wandb/offline-run-*/run-<id>.wandb``) the way ``wandb sync`` would.

W&B 0.31 has no reader API for them: a file is a LevelDB-style log (a 7-byte header ``:W&B`` + 3 bytes,
32 KiB blocks, records of a 7-byte header ``<crc, length, type>`` and a piece of a ``Record`` protobuf).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7


def records(path: Path):
    """The ``Record`` protobufs of one offline run file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, chunk = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class Run:
    id: str
    name: str = ""
    project: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per log call, with "_step"
    summary: dict[str, Any] = field(default_factory=dict)
    files: int = 0  # offline run folders of this id (a resumed run writes another one)

    def steps(self, key: str) -> list[tuple[int, Any]]:
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_runs(root: Path) -> dict[str, Run]:
    """Every offline run under ``root`` (``root/wandb/...``) by its id, resumed parts merged in time order."""
    runs: dict[str, Run] = {}
    for path in sorted((Path(root) / "wandb").glob("offline-run-*/run-*.wandb")):  # folder names: start time
        file = list(records(path))
        (head,) = [record.run for record in file if record.WhichOneof("record_type") == "run"][:1]
        run = runs.setdefault(head.run_id, Run(head.run_id))
        run.files += 1
        run.name, run.project, run.group = head.display_name or run.name, head.project, head.run_group
        run.config.update({i.key: json.loads(i.value_json) for i in head.config.update})
        for record in file:
            kind = record.WhichOneof("record_type")
            if kind == "config":
                run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    for run in runs.values():
        run.config.pop("_wandb", None)  # W&B's own bookkeeping
    return runs
