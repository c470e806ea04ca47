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
# # 04 - Training: parquet shards, LM and flow fine-tuning, resume, export
#
# The whole recipe at toy scale: synthesise a few utterances, turn them into training shards in the
# official parquet layout (`scripts/make_parquet.py`), fine-tune the text-speech LM and the flow with the
# `cosyvoice2-jax train` CLI and the YAMLs in `configs/train/`, resume from a checkpoint, draw the loss curves
# and export the trained weights to the official file names (`llm.pt`, `flow.pt`, ...).
#
# Tiny random-weight release built with `scripts/make_random_release.py`. With the real `CosyVoice2-0.5B`
# (`MODEL_DIR` below) the same cells fine-tune the real model (use real speech, more steps and an accelerator).
# Outputs: `notebooks/out/04_training/`.

# %%
import json
import subprocess
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
LM_STEPS, FLOW_STEPS = 200, 20  # optimizer steps (toy scale; a flow step on these 3-18 s utterances costs seconds on a CPU)
OUT, MODEL_DIR = notebook_release("04_training", MODEL_DIR)  # a tiny random-weight release unless MODEL_DIR is set

# %% [markdown]
# ## 1. Data: synthesise a few utterances
# Eight sentences in the voice of the shipped prompt, one batched call. Each wav gets its transcript beside it
# (`name.txt`), the folder layout `make_parquet.py --wav-dir` reads (speaker = folder name).

# %%
import jax
import soundfile as sf

from cosyvoice2_jax.pipeline import CosyVoice2
from cosyvoice2_jax.pipeline.frontend import example_prompt
from cosyvoice2_jax.pipeline.model import SynthesisRequest

tts = CosyVoice2.from_pretrained(MODEL_DIR, cache_dir=OUT / "cache", seed=0)
prompt_path, prompt_text = example_prompt()
texts = ["The quick brown fox.", "A tiny model learns fast.", "Training data comes first.", "Shards hold many rows.",
         "Loss curves go down.", "Checkpoints let runs resume.", "Export writes the official files.", "That is all."]
wavs = tts.synthesize_batch([SynthesisRequest("zero_shot", t, prompt_wav=prompt_path, prompt_text=prompt_text,
                                              key=jax.random.PRNGKey(i)) for i, t in enumerate(texts)])
DATA = OUT / "data" / "speaker_a"
DATA.mkdir(parents=True, exist_ok=True)
for i, (t, w) in enumerate(zip(texts, wavs)):
    sf.write(DATA / f"utt{i:02d}.wav", w, tts.sample_rate)
    (DATA / f"utt{i:02d}.txt").write_text(t + "\n", encoding="utf-8")
print(f"{len(wavs)} utterances, {sum(w.shape[0] for w in wavs) / tts.sample_rate:.1f} s of audio in {DATA}")
display(Audio(wavs[0], rate=tts.sample_rate))

# %% [markdown]
# ## 2. Parquet shards
# `scripts/make_parquet.py` extracts speech tokens (S3Tokenizer) and CAM++ embeddings with our JAX extractors
# from the release and writes the official columns, 4 utterances per shard here, plus `data.list`.

# %%
PARQUET = OUT / "parquet"
t0 = time.perf_counter()
subprocess.run([sys.executable, str(REPO / "scripts" / "make_parquet.py"), "--wav-dir", str(DATA.parent),
                "--out", str(PARQUET), "--model-dir", str(MODEL_DIR), "--num-utts-per-parquet", "4", "--overwrite"],
               check=True)
print(f"{time.perf_counter() - t0:.1f} s")
print((PARQUET / "data.list").read_text())

import pyarrow.parquet as pq

with open((PARQUET / "data.list").read_text().split()[0], "rb") as f:
    table = pq.read_table(f)
print(table.schema.names)
lens = [len(x) for x in table.column("speech_token").to_pylist()]
print("speech tokens per utterance in shard 0:", lens)

# %% [markdown]
# ## 3. Fine-tune the LM with the CLI
# `configs/train/lm.yaml` with overrides: the release's model config (written as a model YAML), its
# tokenizer, `init_from` the release, our data, a toy schedule. A re-run of the same command resumes from the
# latest checkpoint in `train.workdir`; here the first run stops at half the steps. The mesh uses every device
# (`train.mesh.data: -1`), so batches are rounded to a multiple of the device count (`data.batch_multiple`).

# %%
from cosyvoice2_jax.pipeline.loading import release_config
from cosyvoice2_jax.pipeline.release import check_release_dir

MODEL_YAML = OUT / "model.yaml"
release_config(check_release_dir(MODEL_DIR)).to_yaml(MODEL_YAML)


def lm_overrides(steps):
    return [f"model={MODEL_YAML}", f"tokenizer_dir={MODEL_DIR / 'CosyVoice-BlankEN'}", f"init_from={MODEL_DIR}",
            f"data.data_list={PARQUET / 'data.list'}", "data.max_frames_in_batch=4000",
            f"data.batch_multiple={jax.device_count()}", f"train.steps={steps}",
            "train.log_every=10", f"train.save_every={LM_STEPS // 2}", f"train.workdir={OUT / 'runs' / 'lm'}",
            "train.optim.lr=1.0e-3", "train.optim.accum_grad=1"]


cmd = [sys.executable, "-m", "cosyvoice2_jax.cli", "train", "--config", str(REPO / "configs" / "train" / "lm.yaml"),
       "--no-progress"] + [a for o in lm_overrides(LM_STEPS // 2) for a in ("--set", o)]
print("cosyvoice2-jax train --config configs/train/lm.yaml --set " + " --set ".join(lm_overrides(LM_STEPS // 2)))
t0 = time.perf_counter()
subprocess.run(cmd, check=True)
print(f"first half: {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## 4. Resume to the full step count
# The same config with `train.steps` raised, run in this kernel through the CLI's own function
# (`cosyvoice2_jax.train.run.run`), which also hands back the trained params for the export below. It restores
# the latest checkpoint, including the data iterator's position.

# %%
from cosyvoice2_jax.train.run import run as train_run

t0 = time.perf_counter()
lm_out = train_run(REPO / "configs" / "train" / "lm.yaml", lm_overrides(LM_STEPS), progress=False)
print(f"resumed to step {int(lm_out['state']['step'])} in {time.perf_counter() - t0:.1f} s "
      f"({lm_out['steps_per_s']:.2f} steps/s)")

# %% [markdown]
# ## 5. Fine-tune the flow
# `configs/train/flow.yaml` (conditional flow matching; its `flow:` section has the research options:
# time-sampling law, CFG drop, loss weighting).

# %%
flow_overrides = [f"model={MODEL_YAML}", f"init_from={MODEL_DIR}", f"data.data_list={PARQUET / 'data.list'}",
                  "data.max_frames_in_batch=4000", f"data.batch_multiple={jax.device_count()}",
                  f"train.steps={FLOW_STEPS}", "train.log_every=10",
                  f"train.save_every={FLOW_STEPS}", f"train.workdir={OUT / 'runs' / 'flow'}", "train.optim.lr=1.0e-3",
                  "train.optim.accum_grad=1"]
t0 = time.perf_counter()
flow_out = train_run(REPO / "configs" / "train" / "flow.yaml", flow_overrides, progress=False)
print(f"flow: {FLOW_STEPS} steps in {time.perf_counter() - t0:.1f} s ({flow_out['steps_per_s']:.2f} steps/s)")

# %% [markdown]
# ## 6. Loss curves
# Every step's metrics are in `<workdir>/metrics.jsonl` (and TensorBoard events in `<workdir>/tb`).

# %%
def metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}  # a resumed run re-logs nothing twice; keep the last row per step


lm_m, flow_m = metrics(OUT / "runs" / "lm"), metrics(OUT / "runs" / "flow")
print("LM metrics:", sorted(next(iter(lm_m.values()))))
fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4), constrained_layout=True)
steps = sorted(lm_m)
a0.plot(steps, [lm_m[s]["loss"] for s in steps], lw=0.8)
a0.axvline(LM_STEPS // 2, color="r", ls="--", lw=0.8, label="resumed from the checkpoint")
a0.set(title="LM: next-speech-token cross-entropy", xlabel="optimizer step", ylabel="loss (nats per token)")
a0.legend()
steps = sorted(flow_m)
a1.plot(steps, [flow_m[s]["loss"] for s in steps], lw=0.8)
a1.set(title="Flow: conditional flow-matching loss", xlabel="optimizer step",
       ylabel="loss (mean squared velocity error, log-mel units^2)")
for a in (a0, a1):
    a.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 7. Export to the official layout
# `convert_release` writes our converted directory; `export_release(..., params=)` writes `llm.pt`, `flow.pt`,
# `hift.pt` (no PyTorch needed), copies the ONNX files, YAML and tokenizer, and the result loads like any release.

# %%
from cosyvoice2_jax.params_util import load_torch_checkpoint
from cosyvoice2_jax.pipeline.loading import convert_release, export_release, read_converted

converted = convert_release(MODEL_DIR, OUT / "converted", overwrite=True)
params = dict(read_converted(converted).params)
params["llm"], params["flow"] = jax.device_get(lm_out["state"]["params"]), jax.device_get(flow_out["state"]["params"])
exported = export_release(converted, OUT / "exported", params=params, overwrite=True)
print(sorted(p.name for p in exported.iterdir()))

fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), constrained_layout=True)
for ax, name in zip(axes, ("llm.pt", "flow.pt")):
    before, after = load_torch_checkpoint(MODEL_DIR / name), load_torch_checkpoint(exported / name)
    assert sorted(before) == sorted(after), "export must write the official key names"
    rel = np.array([np.linalg.norm(np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64))
                    / max(np.linalg.norm(np.asarray(before[k], np.float64)), 1e-12) for k in before])
    print(f"{name}: {len(before)} tensors, same names and shapes; {np.sum(rel > 0)} changed by training")
    ax.hist(np.log10(np.maximum(rel, 1e-12)), bins=40)
    ax.set(title=f"{name}: change per tensor after fine-tuning", xlabel="log10(|after - before| / |before|)",
           ylabel="number of tensors")
plt.show()

tuned = CosyVoice2.from_pretrained(exported, cache=False, seed=0)
audio = np.concatenate([o["tts_speech"][0] for o in tuned.inference_zero_shot(
    "The fine-tuned model speaks.", prompt_text, prompt_path, key=jax.random.PRNGKey(0))])
print(f"fine-tuned release: {audio.shape[0] / tuned.sample_rate:.2f} s of audio")
display(Audio(audio, rate=tuned.sample_rate))
