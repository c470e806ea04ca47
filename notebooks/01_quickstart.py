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
# # 01 - Quick start: every synthesis mode, streaming, batching
#
# This notebook loads a CosyVoice 2 release directory, runs each of the official synthesis modes,
# compares streaming with offline synthesis and plots waveforms and mel spectrograms.
#
# By default it builds a **tiny random-weight release** in the official layout with the project's
# own script (the official PyTorch modules write it, so the oracle environment from
# `scripts/setup_oracle_env.sh` must exist). Random weights give noise-like audio: the point here
# is the API and the shapes. For real speech, set `MODEL_DIR` to the downloaded
# `CosyVoice2-0.5B` directory; nothing else changes.

# %%
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Audio, display

REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
OUT = REPO / "out" / "notebooks"
OUT.mkdir(parents=True, exist_ok=True)
MODEL_DIR = Path(os.environ.get("COSYVOICE2_MODEL_DIR", OUT / "CosyVoice2-tiny"))  # <- the real release here

if not (MODEL_DIR / "cosyvoice2.yaml").exists():
    t0 = time.time()
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_release.py"), str(MODEL_DIR), "--overwrite"],
                   check=True, cwd=REPO)
    print(f"built a tiny random release in {time.time() - t0:.0f} s")

# %% [markdown]
# ## Load
# The first load converts every file of the release and caches the result (Orbax) in
# `$COSYVOICE2_JAX_CACHE`; later loads restore the cache.

# %%
from cosyvoice2_jax.assets import PROMPT_TEXT, PROMPT_WAV
from cosyvoice2_jax.frontend.audio import load_wav, mel_24k
from cosyvoice2_jax.pipeline import CosyVoice2, SynthesisRequest

t0 = time.time()
tts = CosyVoice2.from_pretrained(MODEL_DIR, sampling="greedy")
print(f"loaded in {time.time() - t0:.1f} s; sample rate {tts.sample_rate} Hz; speakers: {tts.list_available_spks()}")
print("prompt:", PROMPT_WAV.name, "-", repr(PROMPT_TEXT))


def collect(gen):
    """Concatenate the chunks a synthesis generator yields; also return the chunk sizes."""
    chunks = [out["tts_speech"] for out in gen]
    return np.concatenate(chunks, axis=1)[0], [c.shape[1] for c in chunks]


# %% [markdown]
# ## Every mode
# The method names and arguments are the official ones; each returns a generator of
# `{"tts_speech": (1, samples)}` at 24 kHz. Prompts may be file paths (any sample rate).

# %%
text = "Hello, this is CosyVoice two running in JAX."
runs = {
    "sft": lambda: tts.inference_sft(text, tts.list_available_spks()[0]),
    "zero_shot": lambda: tts.inference_zero_shot(text, PROMPT_TEXT, str(PROMPT_WAV)),
    "cross_lingual": lambda: tts.inference_cross_lingual(text, str(PROMPT_WAV)),
    "instruct2": lambda: tts.inference_instruct2(text, "Speak slowly and calmly.", str(PROMPT_WAV)),
    "vc": lambda: tts.inference_vc(str(PROMPT_WAV), str(PROMPT_WAV)),
}
audio = {}
for mode, run in runs.items():
    t0 = time.time()
    audio[mode], _ = collect(run())
    print(f"{mode:14s} {audio[mode].shape[0] / tts.sample_rate:5.2f} s of audio in {time.time() - t0:5.1f} s")

# %%
fig, axes = plt.subplots(len(audio), 1, figsize=(10, 1.6 * len(audio)), sharex=True)
for ax, (mode, wav) in zip(axes, audio.items()):
    ax.plot(np.arange(wav.shape[0]) / tts.sample_rate, wav, lw=0.4)
    ax.set_title(f"inference_{mode}")
    ax.set_ylabel("amplitude")
axes[-1].set_xlabel("time (s)")
fig.tight_layout()
plt.show()
display(Audio(audio["zero_shot"], rate=tts.sample_rate))

# %% [markdown]
# ## Mel spectrogram of the output
# The flow predicts an 80-bin log-mel at 50 frames/s; this is the same analysis applied to the
# vocoded waveform.

# %%
mel = mel_24k(audio["zero_shot"], sr=tts.sample_rate)  # (frames, 80)
fig, ax = plt.subplots(figsize=(10, 3))
im = ax.imshow(mel.T, origin="lower", aspect="auto", extent=(0, mel.shape[0] / 50, 0, mel.shape[1]))
ax.set_title("zero_shot output: log-mel spectrogram")
ax.set_xlabel("time (s)")
ax.set_ylabel("mel bin")
fig.colorbar(im, ax=ax, label="log magnitude")
plt.show()

# %% [markdown]
# ## Streaming vs offline
# Streaming yields chunks as the LM produces tokens (hop 25 tokens growing to 100, 3 look-ahead
# tokens, cross-faded). With greedy decoding the two runs produce the same tokens; the audio
# differs only where the official streaming runtime differs (chunk-masked flow for the
# intermediate chunks).

# %%
long_text = "Streaming synthesis yields audio chunk by chunk, so playback can start early. " * 2
t0 = time.time()
offline, _ = collect(tts.inference_zero_shot(long_text, PROMPT_TEXT, str(PROMPT_WAV)))
t_off = time.time() - t0
t0 = time.time()
first = None
chunks = []
for out in tts.inference_zero_shot(long_text, PROMPT_TEXT, str(PROMPT_WAV), stream=True):
    first = first or time.time() - t0
    chunks.append(out["tts_speech"][0])
t_stream = time.time() - t0
streamed = np.concatenate(chunks)
print(f"offline: {offline.shape[0] / tts.sample_rate:.2f} s audio in {t_off:.1f} s")
print(f"stream : {streamed.shape[0] / tts.sample_rate:.2f} s audio in {t_stream:.1f} s, "
      f"first chunk after {first:.1f} s, {len(chunks)} chunks")

fig, ax = plt.subplots(figsize=(10, 2.5))
ax.plot(np.arange(offline.shape[0]) / tts.sample_rate, offline, lw=0.4, label="offline")
ax.plot(np.arange(streamed.shape[0]) / tts.sample_rate, streamed, lw=0.4, alpha=0.7, label="streaming")
edges = np.cumsum([c.shape[0] for c in chunks])[:-1] / tts.sample_rate
for e in edges:
    ax.axvline(e, color="k", lw=0.5, ls=":")
ax.set_title("offline vs streaming output (dotted: chunk boundaries)")
ax.set_xlabel("time (s)")
ax.set_ylabel("amplitude")
ax.legend(loc="upper right")
plt.show()

# %% [markdown]
# ## Batched synthesis
# `synthesize_batch` runs many requests through one batched LM, flow and vocoder call. Each row
# has its own PRNG key, so a request's result does not depend on what else is in the batch.

# %%
texts = ["The first sentence.", "A second, somewhat longer sentence in the same batch.", "Third."]
reqs = [SynthesisRequest(mode="zero_shot", text=t, prompt_wav=str(PROMPT_WAV), prompt_text=PROMPT_TEXT)
        for t in texts]
t0 = time.time()
outs = tts.synthesize_batch(reqs)
print(f"{len(outs)} requests in {time.time() - t0:.1f} s:", [f"{o.shape[-1] / tts.sample_rate:.2f} s" for o in outs])
single = collect(tts.inference_zero_shot(texts[0], PROMPT_TEXT, str(PROMPT_WAV)))[0]
print("batch row 0 vs single call, max |diff|:", float(np.max(np.abs(np.ravel(outs[0])[: single.shape[0]] - single))))
