"""Oracle tasks for the streaming flow: the official chunk loop of ``CosyVoice2Model.tts(stream=True)``.

The loop below follows ``cosyvoice/cli/model.py`` (pip snapshot: fixed hop 25; HEAD: the hop grows
by ``stream_scale_factor`` up to ``token_max_hop_len``), with all tokens available up front: every
chunk re-runs ``flow.inference`` from token 0 on ``token[:offset + hop + 3]`` (``streaming=True,
finalize=False``) and keeps the frames after ``2 * offset``. The final chunk runs over all tokens
with ``finalize=True``; the official passes no ``streaming`` flag there (``streaming=False``), and
this task also returns the chunk-masked variant (``streaming=True``) for the cached streamer.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from common import to_np, to_torch
from flow import _build


@torch.no_grad()
def stream_loop(inputs, dims=None, seed=0, hop=25, max_hop=25, scale=2, lookahead=3, final=True, repeats=1,
                max_chunks=None):
    """inputs: token (1, N), prompt_token (1, S0), prompt_feat (1, 2*S0, 80), embedding (1, 192).

    Returns ``chunk_{k}`` mels ``(F_k, 80)`` (channel-last) of the non-final chunks,
    ``final_official`` / ``final_stream`` (if ``final``), ``times`` (s, per chunk, min over
    ``repeats``; final chunk last, official variant), ``tokens`` (tokens given per chunk) and
    ``threads``. ``max_chunks``: stop after that many non-final chunks (timing runs).
    """
    flow = _build(dims, seed)
    token, ptoken = to_torch(inputs["token"]).long(), to_torch(inputs["prompt_token"]).long()
    pfeat, emb = to_torch(inputs["prompt_feat"]).float(), to_torch(inputs["embedding"]).float()
    N, S0, r = token.shape[1], ptoken.shape[1], flow.token_mel_ratio

    def run(tok, streaming, finalize):
        best, feat = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            feat, _ = flow.inference(tok, torch.tensor([tok.shape[1]]), ptoken, torch.tensor([S0]), pfeat,
                                     torch.tensor([pfeat.shape[1]]), emb, streaming=streaming, finalize=finalize)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return feat, best

    out, times, ntok = {}, [], []
    pad = math.ceil(S0 / hop) * hop - S0
    offset, cur, k = 0, hop, 0
    while True:
        this = cur + pad if offset == 0 else cur
        if N - offset < this + lookahead or (max_chunks is not None and k >= max_chunks):
            break
        end = offset + this + lookahead
        feat, dt = run(token[:, :end], True, False)
        out[f"chunk_{k}"] = to_np(feat[0, :, r * offset:].T)
        times.append(dt)
        ntok.append(end)
        offset += this
        cur = min(max_hop, cur * scale)
        k += 1
    if final:
        feat, dt = run(token, False, True)
        out["final_official"] = to_np(feat[0, :, r * offset:].T)
        times.append(dt)
        ntok.append(N)
        feat, _ = run(token, True, True)
        out["final_stream"] = to_np(feat[0, :, r * offset:].T)
    out["times"] = np.asarray(times)
    out["tokens"] = np.asarray(ntok)
    out["threads"] = np.asarray(torch.get_num_threads())
    return out
