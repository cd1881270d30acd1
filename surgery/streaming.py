"""Streaming conversion of a checkpoint on disk: safetensors read and written tensor by tensor.

For patches whose weight change is a function of each tensor alone (`Patch.streamable`, e.g. mean
kv-head pooling), the model never exists in memory: the patch is checked, applied and recorded on
a meta-device skeleton (which yields the new config and the record), and each output shard is
written by computing its header from the input header and then transforming one tensor at a time.
Peak memory is about two tensors, whatever the model size."""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from surgery.errors import SurgeryError
from surgery.hub import NOT_COPIED, atomic_dir, check_output, clone_file, skeleton, write_metadata
from surgery.patch import Patch, PatchRecord

log = logging.getLogger(__name__)

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX = "model.safetensors.index.json"
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where tensor data starts) of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def stream_file(src: Path, dst: Path, transform: Transform) -> int:
    """Write `dst` with every tensor of `src` passed through `transform`; returns bytes written.
    Output shapes come from running `transform` on meta tensors, so the header is written first."""
    header, start = read_header(src)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])  # file order: sequential reads
    out_header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in names:
        info = header[name]
        shape = transform(name, torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], device="meta")).shape
        nbytes = DTYPES[info["dtype"]].itemsize * int(torch.Size(shape).numel())
        out_header[name] = {"dtype": info["dtype"], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        # Read through a private read-only mapping (page-cache speed, no copies for unchanged tensors)
        # and drop each tensor's pages from this process right after use, so resident memory stays
        # at about one tensor while the file's pages stay in the shared page cache.
        mapped = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(src) > start else None
        fout.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            info = header[name]
            begin, end = (start + o for o in info["data_offsets"])
            dtype = DTYPES[info["dtype"]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
                raw = (
                    torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
                    if end > begin
                    else torch.empty(0, dtype=torch.uint8)
                )
            result = transform(name, raw.view(dtype).reshape(info["shape"])).contiguous()
            assert list(result.shape) == out_header[name]["shape"] and result.dtype == dtype
            data, done = memoryview(result.view(torch.uint8).reshape(-1).numpy()), 0
            while done < len(data):
                done += fout.write(data[done:])
            del raw, result, data
            if end > begin:
                page = mmap.PAGESIZE
                lo = begin - begin % page
                mapped.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        if mapped is not None:
            mapped.close()
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
    from transformers import AutoConfig

    src, out = Path(src), Path(out)
    check_output(out, force)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SurgeryError(f"{src} has no .safetensors files to stream; convert it or drop --streaming")
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    dtype = config.dtype
    model = skeleton(config)
    transform = patch.tensor_transform(model.config)  # from the config *before* the patch
    record = patch.apply(model)  # on meta: validates, rewrites shapes, verifies, records
    model.config.dtype = dtype
    with atomic_dir(out, force) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED | {INDEX}:
                clone_file(f, tmp / f.name)
        total = 0
        for i, shard in enumerate(shards, 1):
            log.info("streaming %s (%d/%d)", shard.name, i, len(shards))
            total += stream_file(shard, tmp / shard.name, transform)
        if (src / INDEX).is_file():
            index = json.loads((src / INDEX).read_text())
            index.setdefault("metadata", {})["total_size"] = total
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(tmp)
        write_metadata(tmp, model.config, base_model)
    return out, record
