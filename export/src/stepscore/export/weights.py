"""Read checkpoint tensors one at a time, without loading the model.

safetensors files are memory-mapped and parsed directly (bf16 included, which numpy cannot read on its
own), so exporting an 8B model holds one tensor in memory at a time, never a model copy. Older
`pytorch_model*.bin` checkpoints are read through torch's mmap loader.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stepscore.errors import ExportError

F32Array = npt.NDArray[np.float32]

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bf16",
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class _SafetensorsFile:
    """One safetensors file: its header read and checked against the file's size at open, so a truncated
    or corrupt download is one clear error before any work, never a failure deep inside the export."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ExportError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
                (header_len,) = struct.unpack("<Q", head)
                if 8 + header_len > size:
                    raise ExportError(f"{path}: not a safetensors file, or truncated (its header runs past the end)")
                header = json.loads(fh.read(header_len))
        except OSError as exc:
            raise ExportError(f"{path}: cannot read ({exc.strerror})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from exc
        if not isinstance(header, dict):
            raise ExportError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self.header: dict[str, Any] = header
        self.base = 8 + header_len
        self._mmap: np.memmap[Any, np.dtype[np.uint8]] | None = None
        self._check(size)

    def _check(self, size: int) -> None:
        end = 0
        for name, info in self.header.items():
            try:
                start, stop = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ExportError(f"{self.path}: tensor {name} has no valid data_offsets (corrupt file)") from exc
            if not 0 <= start <= stop:
                raise ExportError(f"{self.path}: tensor {name} has data_offsets {start}..{stop} (corrupt file)")
            end = max(end, stop)
        if self.base + end > size:
            raise ExportError(
                f"{self.path}: truncated: {size:,} bytes, but its tensors need {self.base + end:,} (download it again)"
            )

    def _raw(self) -> np.memmap[Any, np.dtype[np.uint8]]:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def close(self) -> None:
        self._mmap = None  # the mapped pages leave this process's memory

    def read(self, name: str) -> F32Array:
        info = self.header[name]
        start, end = info["data_offsets"]
        kind = _ST_DTYPES.get(info["dtype"])
        if kind is None:
            raise ExportError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        raw = self._raw()[self.base + start : self.base + end]
        if kind == "bf16":
            # bf16 is the top half of an fp32: widen by shifting into the high 16 bits, in one
            # allocation (the largest tensor, an embedding table, sets the export's peak memory).
            wide = np.empty(raw.shape[0] // 2, dtype=np.uint32)
            np.left_shift(raw.view(np.uint16), 16, out=wide, dtype=np.uint32)
            arr = wide.view(np.float32)
        else:
            arr = raw.view(kind).astype(np.float32)
        return arr.reshape(info["shape"])


class WeightStore:
    """Tensors of a Hugging Face checkpoint folder, by name, read lazily as float32."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, _SafetensorsFile] = {}
        self._torch: dict[str, Any] | None = None
        files = sorted(folder.glob("*.safetensors"))
        if files:
            for file in files:
                st = _SafetensorsFile(file)
                for name in st.header:
                    self._index[name] = st
        else:
            bins = sorted(folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ExportError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
            self._torch = _load_torch_bins(bins)

    def names(self) -> list[str]:
        return sorted(self._torch if self._torch is not None else self._index)

    def __contains__(self, name: str) -> bool:
        return name in (self._torch if self._torch is not None else self._index)

    def get(self, name: str) -> F32Array:
        if self._torch is not None:
            if name not in self._torch:
                raise ExportError(f"checkpoint has no tensor {name!r}")
            return np.asarray(self._torch[name].float().numpy(), dtype=np.float32)
        st = self._index.get(name)
        if st is None:
            raise ExportError(f"checkpoint has no tensor {name!r}")
        return st.read(name)

    def close(self) -> None:
        """Unmap the checkpoint files (their touched pages count in the process's memory)."""
        for st in set(self._index.values()):
            st.close()
        self._torch = None if self._torch is None else {}

    def items(self, prefix: str = "") -> Iterator[tuple[str, F32Array]]:
        for name in self.names():
            if name.startswith(prefix):
                yield name, self.get(name)


def _load_torch_bins(paths: list[Path]) -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is part of the export extra
        raise ExportError("reading pytorch_model*.bin needs torch: pip install 'stepscore[export]'") from exc
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            merged.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except OSError as exc:
            raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        except Exception as exc:  # torch raises many types for a corrupt file: each is one line here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{path}: not a readable PyTorch checkpoint, or truncated ({first})") from exc
    return merged
