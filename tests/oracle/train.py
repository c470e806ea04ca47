"""Oracle tasks for training tests: load *our exported* state dicts into the official modules."""
from __future__ import annotations

import torch

from common import to_np


def _sd(inputs):
    return {k[3:]: torch.from_numpy(v.copy()) for k, v in inputs.items() if k.startswith("sd/")}


@torch.no_grad()
def lm_forward_from_sd(inputs, cfg: str):
    """Build the official Qwen2LM (config JSON), load ``sd/*`` strictly, run ``forward`` on the batch
    with ``random.random()`` replayed from ``uniforms``."""
    import llm as L

    lm = L._model(cfg, seed=0, reinit=False)
    missing, unexpected = lm.load_state_dict(_sd(inputs), strict=True)
    assert not missing and not unexpected
    batch = L._batch(inputs)
    with L._with_uniforms(inputs["uniforms"].tolist()):
        out = lm.forward(batch, torch.device("cpu"))
    return {"loss": to_np(out["loss"]), "acc": to_np(out["acc"])}


@torch.no_grad()
def flow_load_strict(inputs, dims=None):
    """The official flow of size ``dims`` loads ``sd/*`` with strict=True; returns its param count."""
    import flow as F

    model = F._build(dims, seed=0)
    model.load_state_dict(_sd(inputs), strict=True)
    return {"n": torch.tensor(sum(p.numel() for p in model.parameters())).numpy()}
