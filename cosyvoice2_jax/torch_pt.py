"""Read PyTorch ``.pt`` state dicts without PyTorch.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle of the dict structure whose
tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls, with
storages as persistent ids ``('storage', <dtype>Storage, key, location, numel)``) and the raw
little-endian storage bytes in ``<name>/data/<key>``.

:func:`load_pt` unpickles with an allow-list: dicts/OrderedDicts, tensors and storages only,
exactly what ``torch.load(weights_only=True)`` accepts for a state dict. Any other global in the
pickle (arbitrary code) is refused. bfloat16 tensors come back as float32.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        if dt == "bfloat16":
            import ml_dtypes

            dt = ml_dtypes.bfloat16
        self.dtype = np.dtype(dt)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    arr = storage
    item = arr.dtype.itemsize
    if len(size) == 0:
        return arr[offset].copy()
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, fp, archive: zipfile.ZipFile, prefix: str):
        super().__init__(fp)
        self.archive, self.prefix = archive, prefix
        self.cache: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors and dicts are allowed "
                                     "in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, _numel = pid
        if key not in self.cache:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            self.cache[key] = np.frombuffer(raw, dtype=stype.dtype.newbyteorder("<"))
        return self.cache[key]


def load_pt(path: str | Path) -> dict[str, Any]:
    """The object (normally a state dict) in a zip-format ``.pt`` file, tensors as numpy arrays."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConversionError(f"{path} is not a zip-format torch checkpoint (legacy pre-1.6 files need "
                              "torch itself: pip install 'cosyvoice2-jax[torch]')") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        with zf.open(pkl[0]) as fp:
            try:
                obj = _Unpickler(fp, zf, prefix).load()
            except pickle.UnpicklingError as e:
                raise ConversionError(f"{path}: {e}") from None
    out = obj

    def fix(v):
        if isinstance(v, np.ndarray) and v.dtype.name == "bfloat16":
            return v.astype(np.float32)
        return v

    if isinstance(out, dict):
        return {k: fix(v) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------- writing
_NP_TO_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                  np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


class _Global:
    """A ``module.name`` reference written as a pickle GLOBAL (no import of ``module`` needed)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable; never called
        raise TypeError(f"{self.module}.{self.name} is a placeholder")


class _Storage:
    def __init__(self, key: str, arr: np.ndarray):
        self.key, self.arr = key, arr


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit torch GLOBALs without torch
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", _NP_TO_STORAGE[obj.arr.dtype]), obj.key, "cpu", int(obj.arr.size))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            stride, acc = [], 1
            for d in reversed(obj.shape):
                stride.insert(0, acc)
                acc *= d
            return (_Global("torch._utils", "_rebuild_tensor_v2"),
                    (obj.storage, 0, tuple(obj.shape), tuple(stride), False, collections.OrderedDict()))
        return NotImplemented


def save_pt(obj: Any, path: str | Path) -> Path:
    """Write a (nested) dict of numpy arrays as a zip-format ``.pt`` that ``torch.load(weights_only=True)``
    reads as tensors (the format ``torch.save`` writes; no PyTorch needed). bfloat16 is not supported."""
    import io

    path = Path(path)
    storages: list[_Storage] = []

    def wrap(v):
        if isinstance(v, dict):
            return collections.OrderedDict((k, wrap(x)) for k, x in v.items())
        a = np.array(v, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        if a.dtype not in _NP_TO_STORAGE:
            raise ConversionError(f"save_pt: dtype {a.dtype} has no torch storage type here")
        s = _Storage(str(len(storages)), a.astype(a.dtype.newbyteorder("<"), copy=False))
        storages.append(s)
        return _Tensor(s, a.shape)

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(wrap(obj))
    name = "archive"
    tmp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", buf.getvalue())
        zf.writestr(f"{name}/byteorder", "little")
        for s in storages:
            zf.writestr(f"{name}/data/{s.key}", s.arr.tobytes())
        zf.writestr(f"{name}/version", "3\n")
    tmp.replace(path)
    return path
