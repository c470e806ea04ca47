"""Torch-free .pt reader vs files written by torch.save (oracle venv)."""
from __future__ import annotations

import numpy as np
import pytest

from cosyvoice2_jax.errors import ConversionError
from cosyvoice2_jax.params_util import load_torch_checkpoint
from cosyvoice2_jax.torch_pt import load_pt
from oracle_client import unflatten_state_dict


def test_reads_torch_save_exactly(oracle, tmp_path):
    p = tmp_path / "sd.pt"
    ref = unflatten_state_dict(oracle("ptfiles:write_pt", path=str(p)))
    got = load_pt(p)
    assert list(got) == list(ref)  # order kept
    for k, v in ref.items():
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(got[k], dtype=v.dtype), v, err_msg=k)
    assert got["steps"].dtype == np.int64 and got["mask"].dtype == np.bool_ and got["bf16"].dtype == np.float32
    # the public loader uses it when torch is absent
    sd = load_torch_checkpoint(p)
    np.testing.assert_array_equal(sd["t"], ref["t"])


def test_refuses_code_and_bad_files(oracle, tmp_path):
    p = tmp_path / "evil.pt"
    oracle("ptfiles:write_malicious_pt", path=str(p))
    with pytest.raises(ConversionError, match="refusing to load posix.system|refusing to load os.system"):
        load_pt(p)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match="not a zip-format"):
        load_pt(tmp_path / "junk.pt")


# ------------------------------------------------------------------ damaged and hostile files (no oracle)
import collections  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import zipfile  # noqa: E402

from cosyvoice2_jax import torch_pt  # noqa: E402
from cosyvoice2_jax.torch_pt import save_pt  # noqa: E402


class _Ref:  # a storage reference as torch.save pickles it
    def __init__(self, key, stype, numel):
        self.key, self.stype, self.numel = key, stype, numel


class _Rec:  # a tensor record with arbitrary (possibly hostile) fields
    def __init__(self, ref, offset, size, stride):
        self.args = (ref, offset, size, stride, False, collections.OrderedDict())


class _HostilePickler(torch_pt._Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Ref):
            return ("storage", torch_pt._Global("torch", obj.stype), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Rec):
            return torch_pt._Global("torch._utils", "_rebuild_tensor_v2"), obj.args
        return NotImplemented


def _write(path, obj, blobs: dict[str, bytes]):
    buf = io.BytesIO()
    _HostilePickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for k, b in blobs.items():
            zf.writestr(f"archive/data/{k}", b)
    return path


def test_hostile_tensor_records_are_refused_with_file_and_key(tmp_path):
    """sizes/strides/offset outside the storage used to reach as_strided unchecked (segfault or
    silently wrong weights); each bad record now names the file and the tensor."""
    f32 = np.arange(6, dtype="<f4").tobytes()  # storage "0": 6 floats
    ok = _Ref("0", "FloatStorage", 6)
    cases = {
        "size": (_Rec(ok, 0, (7,), (1,)), {"0": f32}, "reach element 6"),
        "stride": (_Rec(ok, 0, (2, 3), (4, 1)), {"0": f32}, "reach element 6"),
        "offset": (_Rec(ok, 4, (3,), (1,)), {"0": f32}, "reach element 6"),
        "huge": (_Rec(ok, 0, (2 ** 40, 2 ** 40), (1, 1)), {"0": f32}, "reach element"),
        "negstride": (_Rec(ok, 5, (2,), (-1,)), {"0": f32}, "bad stride"),
        "negsize": (_Rec(ok, 0, (-1,), (1,)), {"0": f32}, "bad size"),
        "ndim": (_Rec(ok, 0, (2, 3), (1,)), {"0": f32}, "bad stride"),
        "floatsize": (_Rec(ok, 0, (2.5,), (1,)), {"0": f32}, "bad size"),
        "negoffset": (_Rec(ok, -1, (1,), (1,)), {"0": f32}, "bad storage offset"),
        "overlap": (_Rec(ok, 0, (1000,), (0,)), {"0": f32}, "overlap"),
        "notstorage": (_Rec(3, 0, (1,), (1,)), {"0": f32}, "not a tensor storage"),
        "entrysize": (_Rec(_Ref("1", "FloatStorage", 8), 0, (8,), (1,)), {"0": f32, "1": f32},
                      "need 32 bytes but its zip entry has 24"),
        "dtype": (_Rec(_Ref("1", "DoubleStorage", 6), 0, (6,), (1,)), {"0": f32, "1": f32}, "need 48 bytes"),
        "missing": (_Rec(_Ref("9", "FloatStorage", 6), 0, (6,), (1,)), {"0": f32}, "no entry archive/data/9"),
        "stype": (_Rec(_Ref("1", "EvilStorage", 6), 0, (6,), (1,)), {"0": f32}, "refusing to load torch.EvilStorage"),
        "bool": (_Rec(_Ref("1", "BoolStorage", 3), 0, (3,), (1,)), {"0": f32, "1": b"\x00\x01\x07"}, "other than 0/1"),
    }
    for name, (rec, blobs, msg) in cases.items():
        p = _write(tmp_path / f"{name}.pt", collections.OrderedDict([("good", _Rec(ok, 0, (2, 3), (3, 1))),
                                                                     (f"layer.{name}", rec)]), blobs)
        with pytest.raises(ConversionError, match=msg) as ei:
            load_pt(p)
        assert str(p) in str(ei.value), name
        if "reach" in msg or "bad" in msg or "overlap" in msg or "tensor storage" in msg:
            assert f"layer.{name}" in str(ei.value), (name, str(ei.value))
    # the same storage named with two types, and a valid strided view (transpose) still loads
    two = collections.OrderedDict([("a", _Rec(ok, 0, (6,), (1,))), ("b", _Rec(_Ref("0", "IntStorage", 6), 0, (6,), (1,)))])
    with pytest.raises(ConversionError, match="named twice"):
        load_pt(_write(tmp_path / "two.pt", two, {"0": f32}))
    got = load_pt(_write(tmp_path / "t.pt", {"t": _Rec(ok, 1, (2, 2), (1, 3)), "e": _Rec(ok, 99, (0, 4), (4, 1))},
                         {"0": f32}))
    np.testing.assert_array_equal(got["t"], [[1, 4], [2, 5]])
    assert got["e"].shape == (0, 4)


def test_fuzzed_files_never_crash(tmp_path):
    """Truncated files, flipped bytes in the archive and in the pickle (re-zipped with valid CRCs):
    every load returns a dict or raises ConversionError; nothing else escapes, nothing crashes."""
    rng = np.random.default_rng(0)
    good = save_pt({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int64),
                    "m": np.array([True, False]), "s": np.float32(2.0)}, tmp_path / "good.pt")
    raw = good.read_bytes()
    with zipfile.ZipFile(good) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    pkl = entries["archive/data.pkl"]
    outcomes = collections.Counter()
    p = tmp_path / "fuzz.pt"
    for i in range(400):
        kind = i % 3
        if kind == 0:  # truncated
            p.write_bytes(raw[: int(rng.integers(0, len(raw)))])
        elif kind == 1:  # archive bytes flipped
            b = bytearray(raw)
            for j in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
                b[j] = int(rng.integers(0, 256))
            p.write_bytes(bytes(b))
        else:  # pickle opcodes/arguments mutated, archive valid
            b = bytearray(pkl)
            for j in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
                b[j] = int(rng.integers(0, 256))
            with zipfile.ZipFile(p, "w") as zf:
                for n, d in entries.items():
                    zf.writestr(n, bytes(b) if n == "archive/data.pkl" else d)
        try:
            out = load_pt(p)
            outcomes["loaded"] += 1
            assert isinstance(out, (dict, list, tuple, int, float, str, bytes, type(None), np.ndarray, bool)), type(out)
        except ConversionError as e:
            outcomes["refused"] += 1
            assert str(p) in str(e)
    assert outcomes["refused"] > 200, outcomes
