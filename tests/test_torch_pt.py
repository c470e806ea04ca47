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
