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
    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        self.header: dict[str, Any] = header
        self.base = 8 + header_len
        self._mmap: np.memmap[Any, np.dtype[np.uint8]] | None = None

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
        merged.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    return merged
