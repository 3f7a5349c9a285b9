"""Reading an offline W&B run folder (`<dir>/wandb/offline-run-*/run-<id>.wandb`) in tests.

The file is a LevelDB-style log (W&B's transaction log): a 7-byte header (":W&B", magic,
version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type:
1 full, 2 first, 3 middle, 4 last piece); each record is a `wandb_internal_pb2.Record`.
"""
import json
import struct
from pathlib import Path

BLOCK = 32768


def read_records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, payloads, pieces = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            payloads.append(pieces + payload)
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item):
    return item.key or "/".join(item.nested_key)


def summarize(path) -> dict:
    """{"config": {top-level key: value}, "history": [row, ...], "summary": {...}, "exit_code": int | None}."""
    out = {"config": {}, "history": [], "summary": {}, "exit_code": None, "run_id": None}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = r.run.run_id
            out["config"].update({_key(u): json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out
