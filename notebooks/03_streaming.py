# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 - Streaming: chunk schedule, chunk masks, constant cost per chunk
#
# CosyVoice 2 streams by running its flow under **static chunk attention masks**: the encoder (25-token
# chunks) and the estimator (50-frame chunks) see all left chunks and nothing beyond their own chunk. The
# official runtime re-runs the flow from token 0 for every chunk; `cosyvoice2_jax.flow.streaming.FlowStreamer`
# keeps per-layer caches instead and returns the same frames at a roughly constant cost per chunk.
#
# Tiny random-weight release built with `scripts/make_random_release.py`; set `MODEL_DIR` to the real
# `CosyVoice2-0.5B` to measure the full-size flow. Outputs: `notebooks/out/03_streaming/`.

# %%
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

REPO = next(p for p in (Path.cwd().resolve(), *Path.cwd().resolve().parents)
            if (p / "scripts" / "make_random_release.py").is_file())
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from make_random_release import notebook_release  # noqa: E402  (the project's release builder)

MODEL_DIR = None  # e.g. REPO / "pretrained_models" / "CosyVoice2-0.5B" for the real weights
OUT, MODEL_DIR = notebook_release("03_streaming", MODEL_DIR)  # a tiny random-weight release unless MODEL_DIR is set

# %% [markdown]
# ## The flow of the release
# Only the flow is needed here: its config from `cosyvoice2.yaml` and its weights from `flow.pt`.

# %%
from cosyvoice2_jax import flow
from cosyvoice2_jax.pipeline.release import check_release_dir, config_from_release_yaml

paths = check_release_dir(MODEL_DIR)
cfg = config_from_release_yaml(paths.yaml)
params = flow.from_release(paths.file("flow"), cfg.flow)
fc = cfg.flow
CHUNK, RATIO, LOOKAHEAD = fc.encoder.static_chunk_size, fc.token_mel_ratio, fc.pre_lookahead_len
print(f"encoder chunk {CHUNK} tokens, estimator chunk {fc.decoder.static_chunk_size} frames, "
      f"{RATIO} mel frames per token (25 tokens/s -> 50 frames/s), look-ahead {LOOKAHEAD} tokens")

# %% [markdown]
# ## The chunk schedule
# The official runtime emits its first chunk after `hop + pad` tokens (`pad` aligns prompt + first hop to the
# hop), each chunk waits for 3 look-ahead tokens, and the hop grows by 2x up to `token_max_hop_len`
# (git HEAD: 25 -> 50 -> 100; the 2025 PyPI snapshot: a fixed 25). `official_pushes` gives the pushes of a
# whole utterance.

# %%
from cosyvoice2_jax.flow.streaming import FlowStreamer, official_pushes

S0, N = 30, 300  # prompt and generated speech tokens (1.2 s + 12 s)
schedules = {"fixed hop 25 (2025 snapshot)": official_pushes(S0, N, hop=25, max_hop=25),
             "25 -> 50 -> 100 (git HEAD)": official_pushes(S0, N, hop=25, max_hop=100)}
fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
for name, pushes in schedules.items():
    sizes = [n for n, _ in pushes]
    a0.plot(range(1, len(sizes) + 1), sizes, marker="o", label=name)
    a1.step([0] + list(np.cumsum(sizes) / 25), range(len(sizes) + 1), where="post", label=name)
a0.set(title=f"Tokens per push ({S0}-token prompt, {N} tokens)", xlabel="push (chunk) index",
       ylabel="new speech tokens in the push")
a1.set(title="Chunks emitted vs speech produced", xlabel="speech tokens received (s of audio at 25 tokens/s)",
       ylabel="chunks emitted")
for a in (a0, a1):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
plt.show()
for name, pushes in schedules.items():
    print(f"{name}: {[n for n, _ in pushes]} (last push finalizes)")

# %% [markdown]
# ## Chunk masks
# `cosyvoice2_jax.layers.masks.chunk_mask(T, c)`: query `i` may attend to key `j` iff `j < (i // c + 1) c`.
# The encoder works on tokens (chunk 25), the estimator on mel frames (chunk 50). Training draws one of the
# paper's four masks per example (non-causal, full causal, chunk M, chunk 2M; `chunk` as a per-example array).

# %%
from cosyvoice2_jax.layers import masks

T = 100
enc = np.asarray(masks.chunk_mask(T, CHUNK))
dec = np.asarray(masks.chunk_mask(RATIO * T, fc.decoder.static_chunk_size))
padded = np.asarray(masks.attention_mask(masks.valid_mask(np.array([70]), T), CHUNK))[0]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
for ax, m, title, unit in [(axes[0], enc, f"encoder: chunk {CHUNK} tokens", "token"),
                           (axes[1], dec, f"estimator: chunk {fc.decoder.static_chunk_size} frames", "mel frame"),
                           (axes[2], padded, f"encoder, 70 valid of {T} tokens", "token")]:
    ax.imshow(m, cmap="Greys", interpolation="nearest")
    ax.set(title=title, xlabel=f"key position ({unit})", ylabel=f"query position ({unit})")
fig.suptitle("Static chunk attention masks (black = may attend)")
plt.show()

four = np.asarray(masks.chunk_mask(60, np.array([0, 1, 10, 20])))
fig, axes = plt.subplots(1, 4, figsize=(14, 3.8), constrained_layout=True)
for ax, m, title in zip(axes, four, ["non-causal (chunk 0)", "full causal (chunk 1)", "chunk M = 10", "chunk 2M = 20"]):
    ax.imshow(m, cmap="Greys", interpolation="nearest")
    ax.set(title=title, xlabel="key position (token)", ylabel="query position (token)")
fig.suptitle("The paper's four training masks (CosyVoice 2, section 2.5), 60 positions")
plt.show()

# %% [markdown]
# ## Per-chunk cost: cached streaming vs recomputing from token 0
# One random utterance (random tokens, prompt mel and x-vector), pushed with the fixed 25-token schedule.
# *Cached*: `FlowStreamer.push` (one compiled program per window length). *Recompute*: the official loop,
# `flow.inference(tokens[:end], ..., streaming=True, finalize=...)` from token 0 for every chunk, keeping the
# new frames. Each path runs once to compile, then once timed.

# %%
r = np.random.default_rng(0)
tokens = r.integers(0, fc.vocab_size, N).astype(np.int32)
prompt_token = r.integers(0, fc.vocab_size, S0).astype(np.int32)
prompt_feat = (r.normal(size=(RATIO * S0, fc.output_size)) - 5.0).astype(np.float32)
embedding = r.normal(size=fc.spk_embed_dim).astype(np.float32)
pushes = schedules["fixed hop 25 (2025 snapshot)"]
block = 2 * fc.decoder.static_chunk_size
streamer = FlowStreamer(params, fc, max_frames=-(-(RATIO * (S0 + N) + block) // block) * block)


def cached():
    state = streamer.start(prompt_token, prompt_feat, embedding)
    fed, times, mels = 0, [], []
    for n, fin in pushes:
        t = time.perf_counter()
        state, mel = streamer.push(state, tokens[fed: fed + n], fin)
        times.append(time.perf_counter() - t)
        mels.append(mel)
        fed += n
    return times, mels


def recompute():
    fed, done, times, mels = 0, 0, [], []
    for n, fin in pushes:
        fed += n
        t = time.perf_counter()
        mel = flow.inference(params, fc, tokens[None, :fed], prompt_token[None], prompt_feat[None], embedding[None],
                             streaming=True, finalize=fin)[0]
        times.append(time.perf_counter() - t)
        mels.append(mel[done:])
        done = mel.shape[0]
    return times, mels


t0 = time.perf_counter()
cached()
recompute()
print(f"warm-up (compiles) {time.perf_counter() - t0:.1f} s")
t_cached, m_cached = cached()
t_recomp, m_recomp = recompute()
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(m_cached, m_recomp))
print(f"frames per chunk: {[m.shape[0] for m in m_cached]}")
print(f"max |cached - recompute| over all chunks: {diff:.2e} (float32 rounding)")
print(f"total: cached {sum(t_cached):.2f} s, recompute {sum(t_recomp):.2f} s")

fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4), constrained_layout=True)
idx = np.arange(1, len(pushes) + 1)
a0.plot(idx, 1e3 * np.asarray(t_cached), marker="o", label="cached (FlowStreamer)")
a0.plot(idx, 1e3 * np.asarray(t_recomp), marker="s", label="recompute from token 0 (official loop)")
a0.set(title="Flow cost per chunk", xlabel="chunk index", ylabel="wall time per chunk (ms)")
a0.legend()
a0.grid(alpha=0.3)
a1.plot(idx, np.cumsum(t_cached), marker="o", label="cached")
a1.plot(idx, np.cumsum(t_recomp), marker="s", label="recompute")
a1.set(title="Cumulative flow time", xlabel="chunk index", ylabel="wall time so far (s)")
a1.legend()
a1.grid(alpha=0.3)
plt.show()

mel = np.concatenate(m_cached)
edges = np.cumsum([m.shape[0] for m in m_cached])[:-1] / 50
fig, ax = plt.subplots(figsize=(12, 3.2), constrained_layout=True)
im = ax.imshow(mel.T, origin="lower", aspect="auto", extent=[0, mel.shape[0] / 50, 0, fc.output_size], cmap="magma")
for e in edges:
    ax.axvline(e, color="c", lw=0.8, ls="--")
ax.set(title="Streamed mel, chunk boundaries dashed", xlabel="time (s)", ylabel="mel bin")
fig.colorbar(im, ax=ax, label="log mel (natural log)")
plt.show()
