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
# # 02 - Flow matching: time grids, solvers, guidance
#
# The flow turns speech tokens into a mel spectrogram by integrating the ODE `dx/dt = v(x, t)` from
# Gaussian noise (`t = 0`) to the mel (`t = 1`). A **sampler** (`cosyvoice2_jax.flow.sampling.SamplerConfig`)
# is a time grid x an ODE solver x a guidance rule; the official one is the cosine grid, 10 Euler steps and
# classifier-free guidance (CFG) 0.7. This notebook draws the grids, follows the ODE trajectories of a few
# mel bins per solver, reproduces the study tool's error-vs-cost (Pareto) plot and compares guidance variants.
#
# It builds a tiny random-weight release with `scripts/make_random_release.py`; set `MODEL_DIR` to the real
# `CosyVoice2-0.5B` to study the trained flow (minutes on a CPU). Outputs: `notebooks/out/02_flow_matching/`.

# %%
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Audio, Image, Markdown, display

REPO = next(p for p in (Path.cwd().resolve(), *Path.cwd().resolve().parents)
            if (p / "scripts" / "make_random_release.py").is_file())
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from make_random_release import notebook_release  # noqa: E402  (the project's release builder)

MODEL_DIR = None  # e.g. REPO / "pretrained_models" / "CosyVoice2-0.5B" for the real weights
OUT, MODEL_DIR = notebook_release("02_flow_matching", MODEL_DIR)  # a tiny random-weight release unless MODEL_DIR is set

# %% [markdown]
# ## Time grids
# `uniform`, `cosine` (`1 - cos(pi u / 2)`, the official grid), `sway:S` (F5-TTS sway sampling; `sway:-1` is
# the cosine grid), `epss` (F5-TTS's pruned step tables) and a grid re-timed to another scheduler. All have
# 7 steps here (EPSS has tables for 5, 6, 7, 10, 12 and 16 steps).

# %%
import jax
import jax.numpy as jnp

from cosyvoice2_jax.flow import sampling as S

STEPS = 7
grids = {name: S.SamplerConfig(steps=STEPS, **kw) for name, kw in {
    "uniform": dict(grid="uniform"), "cosine (official)": dict(grid="cosine"), "sway:-0.5": dict(grid="sway:-0.5"),
    "sway:+0.5": dict(grid="sway:0.5"), "epss": dict(grid="epss"), "uniform > cosine (retime)": dict(retime="cosine",
                                                                                                        grid="uniform"),
}.items()}
fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
for row, (name, s) in enumerate(grids.items()):
    ts = np.asarray(s.time_grid())
    a0.plot(np.arange(STEPS + 1), ts, marker="o", label=name)
    a1.scatter(ts, np.full_like(ts, row), marker="|", s=300)
a0.set(title=f"Time grids ({STEPS} steps)", xlabel="step index i", ylabel="flow time t_i (0 = noise, 1 = mel)")
a0.legend(fontsize=8)
a0.grid(alpha=0.3)
a1.set_yticks(range(len(grids)), list(grids))
a1.set(title="Where the steps fall", xlabel="flow time t (dimensionless)", ylabel="time grid")
a1.grid(axis="x", alpha=0.3)
plt.show()

# %% [markdown]
# ## The flow, its conditioning and an `estimate` function
# `scripts/flow_study.py` has the pieces: the flow and HiFT weights of a release (`load_flow`), random
# utterances (prompt tokens + prompt mel + x-vector + tokens, `make_utterances`), the step-invariant
# packed inputs (`packed_inputs`: prompt ++ tokens, prompt mel, x-vector) and the estimator in the sampling protocol
# `estimate(x_rows, t, k, state) -> (v_rows, state)` (`make_estimate`; CFG stacks `[conditioned; unconditioned]` rows).

# %%
import flow_study as FS
from cosyvoice2_jax.flow import cfm

cfg, flow_params, hift_params = FS.load_flow(MODEL_DIR)
utt = FS.make_utterances(FS.Utterances(count=1, prompt_tokens=25, tokens=50, seed=0), cfg)
cond = FS.packed_inputs(cfg, utt)
estimate = FS.make_estimate(flow_params, cfg, cond)  # the encoder runs here, once
B, n_tok = cond["tokens"].shape
F = cfg.flow.token_mel_ratio * n_tok
N0 = int(utt["prompt_frames"])  # prompt frames: the generated mel starts after them
z = cfm.initial_noise("official", B, F, cfg.flow.output_size)  # the release's fixed noise, as the official
print(f"{B} utterance, {F} mel frames ({N0} prompt frames), {cfg.flow.output_size} mel bins")

# %% [markdown]
# ## ODE trajectories per solver
# The sampling loop threads a `state` through every velocity evaluation (the streaming flow keeps its caches
# there). Here the state records `x` at each evaluation, so one jitted `sample` call returns the whole path.
# Every solver gets 8 velocity evaluations (NFE): Euler 8 steps, midpoint and Heun 4, RK4 2 (uniform grid).
# The dense reference is RK4 with 64 steps; the star is the adaptive Tsit5 solution (`reference_solve`).

# %%
FRAME, BINS = N0 + 20, (5, 40, 70)  # one generated frame, three mel bins


def trajectory(sampler):
    """x at the first stage of every solver step (= the grid points) and the end point."""
    n = S.n_evals(sampler)
    st = S.stages(sampler.solver)

    def recording(x_rows, t, k, state):
        xs, tk = state
        v, _ = estimate(x_rows, t, k, None)
        return v, (xs.at[k].set(x_rows[:B]), tk.at[k].set(t))

    state0 = (jnp.zeros((n, B, F, cfg.flow.output_size)), jnp.zeros((n,)))
    x1, (xs, tk) = jax.jit(lambda z, s0: S.sample(recording, z, sampler, s0))(z, state0)
    xs, tk = np.asarray(xs)[::st], np.asarray(tk)[::st]
    return np.append(tk, 1.0), np.concatenate([xs, np.asarray(x1)[None]])


solvers = {"euler x8": S.SamplerConfig(steps=8, solver="euler", grid="uniform"),
           "midpoint x4": S.SamplerConfig(steps=4, solver="midpoint", grid="uniform"),
           "heun x4": S.SamplerConfig(steps=4, solver="heun", grid="uniform"),
           "rk4 x2": S.SamplerConfig(steps=2, solver="rk4", grid="uniform")}
ref_t, ref_x = trajectory(S.SamplerConfig(steps=64, solver="rk4", grid="uniform"))
field, _ = S.reference_field(estimate, S.SamplerConfig())
x_tsit, stats = jax.jit(lambda z: S.reference_solve(field, z, rtol=1e-5, atol=1e-5))(z)
print(f"Tsit5 reference: {int(stats['num_steps'])} accepted steps, {int(stats['n_evals'])} evaluations")
paths = {name: trajectory(s) for name, s in solvers.items()}

fig, axes = plt.subplots(1, len(BINS), figsize=(14, 4), constrained_layout=True)
for ax, b in zip(axes, BINS):
    ax.plot(ref_t, ref_x[:, 0, FRAME, b], color="k", lw=2, alpha=0.35, label="rk4 x64 (dense)")
    for name, (t, x) in paths.items():
        ax.plot(t, x[:, 0, FRAME, b], marker="o", ms=4, label=name)
    ax.plot([1.0], [float(x_tsit[0, FRAME, b])], marker="*", ms=14, color="k", ls="none", label="Tsit5 adaptive")
    ax.set(title=f"mel bin {b}, frame {FRAME}", xlabel="flow time t (0 = noise, 1 = mel)",
           ylabel="x(t) (log-mel units)")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle("ODE trajectories at equal cost (8 velocity evaluations, CFG 0.7)")
plt.show()
for name, (t, x) in paths.items():
    err = float(np.mean(np.abs(x[-1][:, N0:] - np.asarray(x_tsit)[:, N0:])))
    print(f"{name:12s} end-point mel L1 vs Tsit5: {err:.2e}")

# %% [markdown]
# ## Error vs estimator passes: the study tool
# `scripts/flow_study.py` solves the same ODE with each sampler and with a tight adaptive reference, then
# plots mel error against cost (estimator passes = NFE x rows; CFG runs two rows). The sweep file format is
# `configs/flow_sweep.yaml`; a small one is written here (the vocoder metric is off to keep it quick).

# %%
SWEEP = OUT / "sweep.yaml"
SWEEP.write_text("""\
reference: {solver: Tsit5, rtol: 1.0e-5, atol: 1.0e-5}
utterances: {count: 1, prompt_tokens: 25, tokens: 50, seed: 0}
noise: official
vocoder: false
samplers:
  - {}                              # official: 10 Euler steps, cosine grid, CFG 0.7
  - {steps: 7, grid: epss}
  - {steps: 10, guidance: none}
product:
  steps: [2, 4, 8]
  solver: [euler, heun]
  grid: [cosine, uniform]
""")
sweep = FS.load_sweep(SWEEP)
t0 = time.perf_counter()
rows = FS.run_study(MODEL_DIR, sweep, vmap=True, progress=False, loaded=(cfg, flow_params, hift_params),
                  perceptual=[])  # perceptual columns (DNSMOS, WER) mean little on random weights
print(f"{len(rows)} samplers in {time.perf_counter() - t0:.1f} s")
(OUT / "study").mkdir(exist_ok=True)
FS.write_outputs(OUT / "study", rows, {"model": MODEL_DIR.name})  # results.csv, results.json, pareto.png
display(Image(filename=str(OUT / "study" / "pareto.png")))
display(Markdown(FS.best_table(rows)))

# %% [markdown]
# ## Guidance variants
# The same 10-step cosine Euler solve with: the official constant CFG 0.7; no guidance (one estimator row:
# half the cost); CFG-Zero* (optimised scale, first step zeroed); guidance only for `t <= 0.6`; a per-step
# schedule decaying from 1.5 to 0. Mel spectrograms, the difference to the official sampler, and the HiFT audio.

# %%
from cosyvoice2_jax.hift.runtime import Vocoder

variants = {
    "cfg 0.7 (official)": S.SamplerConfig(),
    "no cfg": S.SamplerConfig(guidance="none"),
    "cfg-zero* + zero step": S.SamplerConfig(guidance="cfg_zero_star", zero_steps=1),
    "cfg on t in [0, 0.6]": S.SamplerConfig(cfg_interval=(0.0, 0.6)),
    "cfg schedule 1.5 -> 0": S.SamplerConfig(cfg_schedule=tuple(np.linspace(1.5, 0.0, 10).round(3).tolist())),
}
fig, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
for name, s in variants.items():
    a = S.guidance_arrays(s)
    ts = np.asarray(a["ts"])[:-1]
    w = np.where((ts >= float(a["interval"][0])) & (ts <= float(a["interval"][1])), np.asarray(a["w"]), 0.0)
    w = np.zeros_like(w) if s.guidance == "none" else w
    ax.step(ts, w, where="post", marker="o", ms=3, label=name)
ax.set(title="Guidance weight per Euler step", xlabel="flow time t at the step", ylabel="CFG weight w (dimensionless)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.show()

mels = {name: np.asarray(jax.jit(lambda z, s=s: S.sample(estimate, z, s)[0])(z))[0, N0:] for name, s in variants.items()}
ref = mels["cfg 0.7 (official)"]
fig, axes = plt.subplots(2, len(mels), figsize=(16, 5.5), constrained_layout=True)
for j, (name, m) in enumerate(mels.items()):
    im = axes[0, j].imshow(m.T, origin="lower", aspect="auto", extent=[0, m.shape[0] / 50, 0, 80], cmap="magma")
    axes[0, j].set(title=name, xlabel="time (s)", ylabel="mel bin")
    d = axes[1, j].imshow((m - ref).T, origin="lower", aspect="auto", extent=[0, m.shape[0] / 50, 0, 80],
                          cmap="coolwarm", vmin=-2, vmax=2)
    axes[1, j].set(title=f"minus official (L1 {np.mean(np.abs(m - ref)):.3f})", xlabel="time (s)", ylabel="mel bin")
fig.colorbar(im, ax=axes[0, :], label="log mel (natural log)")
fig.colorbar(d, ax=axes[1, :], label="difference (natural-log units)")
fig.suptitle("Generated mel per guidance variant (10 Euler steps, cosine grid)")
plt.show()

vocoder = Vocoder(cfg.hift, hift_params)
for name, m in mels.items():
    audio = vocoder([m], [jax.random.PRNGKey(0)])[0][0]
    print(name, f"({audio.shape[0] / cfg.sample_rate:.2f} s)")
    display(Audio(np.asarray(audio), rate=cfg.sample_rate))
