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
    """A storage class named in the pickle (``torch.FloatStorage`` ...); only its name is used."""

    def __init__(self, name: str):
        self.name = name


def _np_dtype(name: str) -> np.dtype:
    dt = _STORAGE_DTYPES[name]
    if dt == "bfloat16":
        import ml_dtypes

        dt = ml_dtypes.bfloat16
    return np.dtype(dt).newbyteorder("<")


class _Record:
    """A tensor as the pickle describes it, checked and built after unpickling (when its key is known)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Storage:
    def __init__(self, key: str, arr: np.ndarray):
        self.key, self.arr = key, arr


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _build(rec: _Record) -> np.ndarray:
    """Check a tensor record against its storage and build the array; ValueError says what is wrong."""
    st, offset = rec.storage, rec.offset
    if not isinstance(st, _Storage):
        raise ValueError(f"its storage is a {type(st).__name__}, not a tensor storage")
    size, stride = rec.size, rec.stride
    if not isinstance(size, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in size):
        raise ValueError(f"bad size {size!r} (needs non-negative integers)")
    if not isinstance(stride, (tuple, list)) or len(stride) != len(size) \
            or not all(_is_int(d) and d >= 0 for d in stride):
        raise ValueError(f"bad stride {stride!r} for size {tuple(size)} (needs one non-negative integer per dim)")
    if not _is_int(offset) or offset < 0:
        raise ValueError(f"bad storage offset {offset!r}")
    n_store = st.arr.shape[0]
    numel = int(np.prod(size, dtype=object)) if size else 1
    if numel == 0:
        return np.zeros(tuple(size), st.arr.dtype)
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= n_store:
        raise ValueError(f"size {tuple(size)} / stride {tuple(stride)} / offset {offset} reach element {last} of "
                         f"storage {st.key!r}, which has {n_store} elements")
    if numel > n_store:
        raise ValueError(f"{numel} elements overlap in storage {st.key!r} of {n_store} (not a weights tensor)")
    if not size:
        return st.arr[offset].copy()
    item = st.arr.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(st.arr[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, fp, archive: zipfile.ZipFile, prefix: str):
        super().__init__(fp)
        self.archive, self.prefix = archive, prefix
        self.cache: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # fresh callables per lookup: a hostile BUILD opcode cannot alter anything shared
        if (module, name) == ("collections", "OrderedDict"):
            return lambda *a: collections.OrderedDict(*a)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: _Record(storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors and dicts are allowed "
                                     "in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}"[:200])
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or stype.name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"storage {key!r}: {stype!r} is not a torch storage type"[:200])
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"storage record {pid!r} has a bad key or element count"[:200])
        dtype = _np_dtype(stype.name)
        if key in self.cache:
            got = self.cache[key]
            if got.arr.dtype != dtype or got.arr.shape[0] != numel:
                raise pickle.UnpicklingError(f"storage {key!r} is named twice with different types or sizes")
            return got
        entry = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(entry)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key!r}: the archive has no entry {entry}") from None
        if info.file_size != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key!r}: {numel} x {dtype.itemsize}-byte elements need "
                                         f"{numel * dtype.itemsize} bytes but its zip entry has {info.file_size}")
        raw = self.archive.read(entry)
        if len(raw) != info.file_size:
            raise pickle.UnpicklingError(f"storage {key!r}: zip entry truncated")
        if dtype == np.bool_ and raw and max(raw) > 1:
            raise pickle.UnpicklingError(f"storage {key!r}: bool storage holds bytes other than 0/1")
        self.cache[key] = _Storage(key, np.frombuffer(raw, dtype=dtype))
        return self.cache[key]


def _materialize(obj, path: Path, where: str = "", depth: int = 0):
    """Replace every tensor record by its checked array (dict keys name the failing tensor)."""
    if depth > 100:
        raise ConversionError(f"{path}: nesting deeper than 100 levels at {where or 'top'}; not a weights file")
    if isinstance(obj, _Record):
        try:
            arr = _build(obj)
        except ValueError as e:
            raise ConversionError(f"{path}: tensor {where or '(top level)'}: {e}; the file is damaged or not a "
                                  "torch weights file (re-download or re-export it)") from None
        return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, path, f"{where}.{k}" if where else str(k), depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj))
    if isinstance(obj, (_Storage, _StorageType)):
        raise ConversionError(f"{path}: a bare storage at {where or 'top'} (not inside a tensor); not a weights file")
    return obj


def load_pt(path: str | Path) -> dict[str, Any]:
    """The object (normally a state dict) in a zip-format ``.pt`` file, tensors as numpy arrays.

    Every tensor record is checked against its storage before it is read: sizes, strides and
    offset must stay inside the storage, the storage's zip entry must hold exactly its element
    count of its dtype. A damaged or hostile file raises :class:`ConversionError` naming the file
    (and the tensor's key), never reads outside the data or crashes.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, OSError, and whatever a damaged central directory raises
        if isinstance(e, OSError) and not path.is_file():
            raise ConversionError(f"{path}: cannot open ({e.strerror or e})") from None
        raise ConversionError(f"{path} is not a zip-format torch checkpoint (legacy pre-1.6 files need "
                              "torch itself: pip install 'cosyvoice2-jax[torch]')") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            with zf.open(pkl[0]) as fp:
                obj = _Unpickler(fp, zf, prefix).load()
        except pickle.UnpicklingError as e:
            raise ConversionError(f"{path}: {e}") from None
        except (Exception, RecursionError) as e:  # damaged archive/pickle: whatever the opcode soup raises
            raise ConversionError(f"{path}: damaged torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                                  "re-download or re-export it") from None
    return _materialize(obj, path)


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


class _WStorage:
    def __init__(self, key: str, arr: np.ndarray):
        self.key, self.arr = key, arr


class _Tensor:
    def __init__(self, storage: _WStorage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit torch GLOBALs without torch
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _WStorage):
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
    storages: list[_WStorage] = []

    def wrap(v):
        if isinstance(v, dict):
            return collections.OrderedDict((k, wrap(x)) for k, x in v.items())
        a = np.array(v, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        if a.dtype not in _NP_TO_STORAGE:
            raise ConversionError(f"save_pt: dtype {a.dtype} has no torch storage type here")
        s = _WStorage(str(len(storages)), a.astype(a.dtype.newbyteorder("<"), copy=False))
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
