"""Streaming conversion of a checkpoint on disk: safetensors read and written tensor by tensor.

For patches whose weight change is a function of each tensor alone (`Patch.streamable`, e.g. mean
kv-head pooling), the model never exists in memory: the patch is checked, applied and recorded on
a meta-device skeleton (which yields the new config and the record), and each output shard is
written by computing its header from the input header and then transforming one tensor at a time.
Peak memory is about two tensors, whatever the model size."""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.checkpoint import INDEX, read_header
from surgery.errors import SurgeryError
from surgery.hub import copy_unchanged, write_metadata
from surgery.io import atomic_dir, bytes_progress, copy_range, reserve, write_all
from surgery.lazy import torch
from surgery.models import checked_skeleton
from surgery.patch import Patch, PatchRecord

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {  # safetensors' names -> torch's
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
Transform = Callable[[str, "torch.Tensor"], "torch.Tensor"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, SAFETENSORS_DTYPES[name])


def stream_file(src: Path, dst: Path, transform: Transform, bar: Any = None) -> int:
    """Write `dst` with every tensor of `src` passed through `transform`; returns bytes written
    (`bar`, a progress bar, advances by the source bytes read).
    Output shapes come from running `transform` on meta tensors, so the header is written first;
    a tensor the transform returns as is (same object) is copied byte for byte by the kernel, the
    others are read one at a time, transformed and written."""
    header, start = read_header(src)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])  # file order: sequential reads
    out_header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    changed: set[str] = set()
    offset = 0
    for name in names:
        info = header[name]
        probe = torch.empty(info["shape"], dtype=torch_dtype(info["dtype"]), device="meta")
        result = transform(name, probe)
        if result is not probe:
            changed.add(name)
        nbytes = torch_dtype(info["dtype"]).itemsize * int(result.shape.numel())
        out_header[name] = {
            "dtype": info["dtype"],
            "shape": list(result.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        write_all(fout, struct.pack("<Q", len(encoded)) + encoded)
        run_start = run_end = None  # a run of unchanged tensors, contiguous in the source
        for name in names + [None]:
            if name is not None and name not in changed:
                begin, end = (start + o for o in header[name]["data_offsets"])
                if run_end == begin:
                    run_end = end
                else:
                    if run_start is not None:
                        copy_range(fin, fout, run_start, run_end - run_start, bar)
                    run_start, run_end = begin, end
                continue
            if run_start is not None:
                copy_range(fin, fout, run_start, run_end - run_start, bar)
                run_start = run_end = None
            if name is None:
                break
            info = header[name]
            begin, end = (start + o for o in info["data_offsets"])
            raw = torch.empty(end - begin, dtype=torch.uint8)
            fin.seek(begin)
            if fin.readinto(memoryview(raw.numpy())) != end - begin:
                raise SurgeryError(f"{src} ended early; is the checkpoint complete?")
            result = transform(name, raw.view(torch_dtype(info["dtype"])).reshape(info["shape"])).contiguous()
            assert list(result.shape) == out_header[name]["shape"], name
            write_all(fout, memoryview(result.view(torch.uint8).reshape(-1).numpy()))
            del raw, result
            if bar is not None:
                bar.update(end - begin)
    return offset


def checkpoint_bytes(src: Path) -> int:
    return sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or physical pages where that is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def should_stream(src: Path) -> bool:
    """True when loading the checkpoint would take more than half of the available memory."""
    return checkpoint_bytes(src) > available_memory() // 2


def apply_streaming(
    patch: Patch, src: Path, out: str | Path, *, base_model: str | None = None, force: bool = False
) -> tuple[Path, PatchRecord]:
    """Apply a streamable patch to a safetensors checkpoint on disk, tensor by tensor."""

    src, out = Path(src), Path(out)
    with reserve(out, force, [src]):
        model, shards, dtype = checked_skeleton(src)  # nothing corrupt or incomplete is streamed
        transform = patch.tensor_transform(model.config)  # from the config *before* the patch
        record = patch.apply(model)  # on meta: validates, rewrites shapes, verifies, records
        model.config.dtype = dtype
        with atomic_dir(out, force, [src]) as tmp:
            copy_unchanged(src, tmp, skip=[INDEX, *(s.name for s in shards)])
            write_shards(src, list(shards), tmp, transform)
            model.config.save_pretrained(tmp)
            write_metadata(tmp, model.config, base_model)
    return out, record


def write_shards(src: Path, shards: list[Path], tmp: Path, transform: Transform) -> None:
    """Every shard through `transform`, and the index with the new total size."""
    total = 0
    with bytes_progress(sum(s.stat().st_size for s in shards), "streaming tensors") as bar:
        for i, shard in enumerate(shards, 1):
            log.info("streaming %s (%d/%d)", shard.name, i, len(shards))
            total += stream_file(shard, tmp / shard.name, transform, bar)
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
