"""Oracle tasks: write ``.pt`` files with torch.save for the torch-free reader tests."""
from __future__ import annotations

import collections
import os

import numpy as np
import torch


def write_pt(inputs, path: str):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = collections.OrderedDict()
    sd["w"] = torch.randn(4, 3, generator=g)
    sd["t"] = base.t()                      # non-contiguous view
    sd["row"] = base[2]                     # offset view sharing storage with "t"
    sd["bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)
    sd["half"] = torch.randn(2, 2, generator=g).half()
    sd["steps"] = torch.tensor(7)           # 0-d int64 (BatchNorm num_batches_tracked)
    sd["mask"] = torch.tensor([True, False, True])
    sd["ids"] = torch.arange(5, dtype=torch.int32)
    sd["param"] = torch.nn.Parameter(torch.ones(3))
    torch.save(sd, path)
    out = {k: (v.detach().float().numpy() if v.dtype in (torch.bfloat16, torch.float16) else v.detach().numpy())
           for k, v in sd.items()}
    return {f"sd/{k}": np.asarray(v) for k, v in out.items()}


def write_malicious_pt(inputs, path: str):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    return {}


def save_state_dict(inputs, path: str):
    """torch.save the ``sd/*`` arrays as a plain state dict (what a release .pt is)."""
    sd = collections.OrderedDict((k[3:], torch.from_numpy(np.ascontiguousarray(v))) for k, v in inputs.items()
                                 if k.startswith("sd/"))
    torch.save(sd, path)
    return {}
