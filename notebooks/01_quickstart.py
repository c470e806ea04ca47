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
# # 01 - Quick start: every synthesis mode, streaming vs offline, batches
#
# This notebook builds a **tiny random-weight release** in the official `CosyVoice2-0.5B` layout with
# the project's own `scripts/make_random_release.py` (the official PyTorch modules write the files;
# needs `.oracle-venv`), loads it with `CosyVoice2.from_pretrained` and runs every mode of the official
# API. Random weights make noise-like audio: the shapes, timings and plots are real, the sound is not.
#
# **Real model:** set `MODEL_DIR` below to your `pretrained_models/CosyVoice2-0.5B`; nothing else changes.
#
# Outputs (release, converted cache, wavs) go to `notebooks/out/01_quickstart/` (or
# `$COSYVOICE2_NOTEBOOK_OUT/01_quickstart`).

# %%
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Audio, display

REPO = next(p for p in (Path.cwd().resolve(), *Path.cwd().resolve().parents)
            if (p / "scripts" / "make_random_release.py").is_file())
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from make_random_release import notebook_release  # noqa: E402  (the project's release builder)

MODEL_DIR = None  # e.g. REPO / "pretrained_models" / "CosyVoice2-0.5B" for the real weights
OUT, MODEL_DIR = notebook_release("01_quickstart", MODEL_DIR)  # a tiny random-weight release unless MODEL_DIR is set

# %% [markdown]
# ## Load the release
# The first load converts every file and caches the result as an Orbax checkpoint (here in the notebook's
# output folder, `cache_dir=`); later loads restore it.

# %%
from cosyvoice2_jax.pipeline import CosyVoice2
from cosyvoice2_jax.pipeline.frontend import example_prompt
from cosyvoice2_jax.frontend.audio import load_wav, mel_24k

t0 = time.perf_counter()
tts = CosyVoice2.from_pretrained(MODEL_DIR, cache_dir=OUT / "cache", seed=0)
print(f"loaded in {time.perf_counter() - t0:.1f} s; sample rate {tts.sample_rate} Hz; "
      f"built-in speakers: {tts.list_available_spks()}")
SR = tts.sample_rate

# %% [markdown]
# ## The prompt
# `cosyvoice2_jax/data/prompt_en.wav` ships with the package (3.2 s of espeak-ng English, free to redistribute).

# %%
prompt_path, prompt_text = example_prompt()
prompt_24k = load_wav(prompt_path, 24000)
print(prompt_path.name, "-", repr(prompt_text), f"- {prompt_24k.shape[0] / 24000:.2f} s")
display(Audio(prompt_24k, rate=24000))


def plot_wave_mel(wav, sr, title, boundaries=()):
    """Waveform (amplitude vs seconds) above its 80-bin log mel (the flow's feature, 50 frames/s)."""
    mel = mel_24k(wav if sr == 24000 else load_wav((wav, sr), 24000))
    t = np.arange(wav.shape[0]) / sr
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True, constrained_layout=True)
    a0.plot(t, wav, lw=0.4)
    a0.set(title=f"{title}: waveform", ylabel="amplitude (full scale)")
    for b in boundaries:
        a0.axvline(b, color="r", lw=0.8, ls="--")
    im = a1.imshow(mel.T, origin="lower", aspect="auto", extent=[0, mel.shape[0] / 50, 0, mel.shape[1]], cmap="magma")
    a1.set(title=f"{title}: log mel spectrogram", xlabel="time (s)", ylabel="mel bin (0-8 kHz)")
    fig.colorbar(im, ax=a1, label="log magnitude (natural log)")
    plt.show()


plot_wave_mel(prompt_24k, 24000, "prompt")

# %% [markdown]
# ## Every synthesis mode
# The official method names; each call is a generator of `{"tts_speech": (1, samples)}` at 24 kHz.
# An explicit PRNG key makes a call reproducible.

# %%
import jax

TEXT = "Hello, this is CosyVoice two in JAX."


def run(gen):
    t = time.perf_counter()
    audio = np.concatenate([o["tts_speech"][0] for o in gen])
    return audio, time.perf_counter() - t


outputs, seconds = {}, {}
spk = tts.list_available_spks()[0]
outputs["sft"], seconds["sft"] = run(tts.inference_sft(TEXT, spk, key=jax.random.PRNGKey(1)))
outputs["zero_shot"], seconds["zero_shot"] = run(
    tts.inference_zero_shot(TEXT, prompt_text, prompt_path, key=jax.random.PRNGKey(1)))
outputs["cross_lingual"], seconds["cross_lingual"] = run(
    tts.inference_cross_lingual(TEXT, prompt_path, key=jax.random.PRNGKey(1)))
outputs["instruct2"], seconds["instruct2"] = run(
    tts.inference_instruct2(TEXT, "Speak happily.", prompt_path, key=jax.random.PRNGKey(1)))
# voice conversion: the zero-shot output (as (array, rate)) spoken in the voice of the built-in prompt
outputs["vc"], seconds["vc"] = run(tts.inference_vc((outputs["zero_shot"], SR), prompt_path, key=jax.random.PRNGKey(1)))

for mode, wav in outputs.items():
    print(f"{mode:14s} {wav.shape[0] / SR:5.2f} s of audio in {seconds[mode]:6.2f} s (first call includes compiles)")
    display(Audio(wav, rate=SR))

# %%
fig, axes = plt.subplots(len(outputs), 1, figsize=(10, 1.6 * len(outputs)), sharex=True, constrained_layout=True)
for ax, (mode, wav) in zip(axes, outputs.items()):
    ax.plot(np.arange(wav.shape[0]) / SR, wav, lw=0.3)
    ax.set(title=mode, ylabel="amplitude")
axes[-1].set_xlabel("time (s)")
fig.suptitle("Output waveforms of the five modes (24 kHz)")
plt.show()
plot_wave_mel(outputs["zero_shot"], SR, "zero_shot output")

# %% [markdown]
# ## Streaming vs offline
# `stream=True` yields audio chunk by chunk as the LM produces speech tokens (official schedule: 25 tokens,
# then 50, then 100; 3 look-ahead tokens; HiFT caches and a Hamming cross-fade). The flow keeps its
# per-chunk caches, so each chunk costs about the same. Streaming runs the flow under chunk attention
# masks, so its audio is close to, but not equal to, the offline (full attention) audio.

# %%
key = jax.random.PRNGKey(7)
chunks, arrivals = [], []
t0 = time.perf_counter()
for out in tts.inference_zero_shot(TEXT, prompt_text, prompt_path, stream=True, key=key):
    chunks.append(out["tts_speech"][0])
    arrivals.append(time.perf_counter() - t0)
streamed = np.concatenate(chunks)
offline, offline_s = run(tts.inference_zero_shot(TEXT, prompt_text, prompt_path, key=key))
print(f"streaming: {len(chunks)} chunks, first after {arrivals[0]:.2f} s, all after {arrivals[-1]:.2f} s; "
      f"offline: {offline_s:.2f} s")
print(f"lengths: streamed {streamed.shape[0]} samples, offline {offline.shape[0]} samples")
display(Audio(streamed, rate=SR))
display(Audio(offline, rate=SR))

ends = np.cumsum([c.shape[0] for c in chunks]) / SR
fig, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
ax.step(ends, arrivals, where="post", marker="o")
ax.set(title="Streaming: when each chunk arrived", xlabel="audio produced so far (s)",
       ylabel="wall time since the call (s)")
ax.grid(alpha=0.3)
plt.show()
plot_wave_mel(streamed, SR, "streamed (red: chunk boundaries)", boundaries=ends[:-1])
n = min(streamed.shape[0], offline.shape[0])
m_s, m_o = mel_24k(streamed[:n]), mel_24k(offline[:n])
fig, ax = plt.subplots(figsize=(10, 3), constrained_layout=True)
im = ax.imshow((m_s - m_o).T, origin="lower", aspect="auto", extent=[0, m_s.shape[0] / 50, 0, 80], cmap="coolwarm")
ax.set(title="log mel: streamed minus offline (same key)", xlabel="time (s)", ylabel="mel bin")
fig.colorbar(im, ax=ax, label="difference (natural-log units)")
plt.show()

# %% [markdown]
# ## Batched synthesis
# `synthesize_batch` runs many requests through one batched LM, flow and HiFT call; each output equals
# the single call with the same key.

# %%
from cosyvoice2_jax.pipeline.model import SynthesisRequest

texts = ["The weather is nice today.", "Batching runs several requests at once.", "Goodbye!"]
reqs = [SynthesisRequest("zero_shot", t, prompt_wav=prompt_path, prompt_text=prompt_text, key=jax.random.PRNGKey(10 + i))
        for i, t in enumerate(texts)]
t0 = time.perf_counter()
batch = tts.synthesize_batch(reqs)
batch_s = time.perf_counter() - t0
single = run(tts.inference_zero_shot(texts[0], prompt_text, prompt_path, key=jax.random.PRNGKey(10)))[0]
print(f"batch of {len(texts)}: {batch_s:.2f} s (first call compiles the batched shapes)")
print("request 0, batched vs single call: max |difference| =",
      float(np.max(np.abs(batch[0][: single.shape[0]] - single))) if batch[0].shape == single.shape else "lengths differ")
for t, wav in zip(texts, batch):
    print(f"{wav.shape[0] / SR:5.2f} s  {t}")
    display(Audio(wav, rate=SR))

fig, ax = plt.subplots(figsize=(7, 3), constrained_layout=True)
ax.barh(range(len(texts)), [w.shape[0] / SR for w in batch])
ax.set_yticks(range(len(texts)), [t[:30] for t in texts])
ax.set(title="Batched synthesis: audio length per request", xlabel="audio duration (s)")
plt.show()

# %%
import soundfile as sf

for mode, wav in outputs.items():
    sf.write(OUT / f"{mode}.wav", wav, SR)
print("wrote", sorted(p.name for p in OUT.glob("*.wav")))
