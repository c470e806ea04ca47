"""Flow-matching sampler study: error against a tight adaptive reference vs cost, per sampler config.

    python scripts/flow_study.py --model-dir DIR [--model-dir DIR2 ...] --sweep sweep.yaml --out OUT_DIR \
        [--reference-model REF_DIR] [--overwrite] [--vmap]

For every sampler config of the sweep (``cosyvoice2_jax.flow.sampling.SamplerConfig``) and a set of
utterances (prompt tokens + prompt mel + x-vector + tokens, drawn from a seed), the flow ODE is
solved with that sampler and with an adaptive diffrax solver (Tsit5/Dopri5, PID control, tight
tolerance) on the *same* ODE (same guidance, same noise). Columns: mel L1 and max-abs error of
the generated frames, log-spectral distance (dB) of the HiFT-vocoded audio (same source noise),
NFE (velocity evaluations), estimator passes (NFE x rows: CFG runs 2 rows per evaluation),
wall time and compile time. Writes ``results.csv``, ``results.json`` and ``pareto.png`` (error vs
estimator passes, one curve per grid/solver/guidance family over the step counts) into OUT_DIR.

``--model-dir``: a release directory (the official layout, e.g. ``scripts/make_random_release.py``)
or a converted one. The sweep YAML::

    reference: {solver: Tsit5, rtol: 1.0e-5, atol: 1.0e-5}   # adaptive reference
    # or: reference: {sampler: {}}   # the output of one fixed sampler ({} = official) as the reference
    utterances: {count: 2, prompt_tokens: 25, tokens: 75, seed: 0}
    noise: official            # the official fixed noise, or an integer seed
    vocoder: true              # log-spectral distance of the vocoded audio (needs hift)
    samplers:                  # SamplerConfig fields; {} is the official sampler
      - {}
      - {steps: 7, grid: epss}
    product:                   # and the cartesian product of these lists
      steps: [4, 8]
      solver: [euler, heun]

Another model as the reference (``--reference-model REF_DIR``, e.g. a distilled student measured
against its teacher): the reference is solved with REF_DIR's flow on the same utterances and noise
(its adaptive reference of each sampler's ODE, or with ``reference: {sampler: {...}}`` in the sweep
the output of that one fixed sampler, e.g. ``sampler: {}`` = the official 10-step Euler, CFG 0.7;
the reference audio is vocoded with REF_DIR's HiFT). ``reference.sampler`` also works without
``--reference-model`` (the measured model's own sampler output). Several ``--model-dir`` give one
table and one plot (column ``model``; the curves are per model); a distilled student
(``FlowConfig.student``) runs each sampler as the pipeline does (``flow.modeling.resolve_sampler``:
one row, the CFG rate fed to its input ``w``). Models and reference share the flow's vocabulary,
mel and x-vector sizes (checked).

``--vmap``: the configs of one structure (solver, steps, guidance) run as one vmapped program
(``sampling.sweep``); the wall time is then the group's time divided by its size.
Perceptual columns (with ``vocoder: true``, each computed when its package is installed, else
empty; ``pip install -e '.[perceptual]'``; every model ships inside its wheel, nothing is downloaded
at run time): ``dnsmos_ovrl/sig/bak`` (DNSMOS P.835 of the sampler's audio, ``speechmos``'s ONNX
models), ``wer`` (word error rate of the pocketsphinx English transcript of the sampler's audio
against the transcript of the reference solution's audio, ``pocketsphinx`` + ``jiwer``) and
``spk_sim`` (cosine similarity of the ``resemblyzer`` speaker embeddings of the sampler's and the
reference's audio; resemblyzer needs torch, so it is not in the extra: install it with
``torch==2.13.0`` yourself). See docs/flow_research.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cosyvoice2_jax.errors import ConfigError, CosyVoiceError  # noqa: E402

SWEEP_KEYS = ("reference", "utterances", "noise", "vocoder", "samplers", "product")
COLUMNS = ("label", "solver", "grid", "retime", "guidance", "cfg_rate", "steps", "nfe", "rows", "estimator_passes",
           "mel_l1", "mel_max_abs", "lsd_db", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "wer", "spk_sim",
           "wall_s", "compile_s", "ref_nfe", "official", "model", "reference")


# ----------------------------------------------------------------------------- sweep file
@dataclasses.dataclass(frozen=True)
class Reference:
    solver: str = "Tsit5"
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    sampler: Any = None  # a SamplerConfig: its output is the reference (instead of the adaptive solve)

    @property
    def label(self) -> str:
        if self.sampler is not None:
            return self.sampler.label
        return f"{self.solver} rtol={self.rtol:g} atol={self.atol:g}"


@dataclasses.dataclass(frozen=True)
class Utterances:
    count: int = 2
    prompt_tokens: int = 25
    tokens: int = 75
    seed: int = 0


@dataclasses.dataclass
class Sweep:
    reference: Reference
    utterances: Utterances
    noise: Any
    vocoder: bool
    samplers: list


def load_sweep(path: Path) -> Sweep:
    import yaml

    from cosyvoice2_jax.config import from_dict
    from cosyvoice2_jax.flow.sampling import SamplerConfig

    if not path.is_file():
        raise ConfigError(f"--sweep {path} does not exist; see the docstring of scripts/flow_study.py for the format")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--sweep {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--sweep {path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"--sweep {path}: unknown keys {unknown}; valid: {', '.join(SWEEP_KEYS)}")
    ref_data = dict(data.get("reference") or {})
    ref_sampler = ref_data.pop("sampler", None)
    ref = from_dict(Reference, ref_data)
    if ref_sampler is not None:
        try:
            ref = dataclasses.replace(ref, sampler=SamplerConfig.from_dict(ref_sampler))
        except ConfigError as e:
            raise ConfigError(f"--sweep {path}, reference.sampler ({ref_sampler}): {e}") from None
    utt = from_dict(Utterances, data.get("utterances") or {})
    if utt.count < 1 or utt.prompt_tokens < 1 or utt.tokens < 1:
        raise ConfigError(f"--sweep {path}: utterances need count, prompt_tokens and tokens >= 1, got {utt}")
    noise = data.get("noise", "official")
    if noise != "official" and (isinstance(noise, bool) or not isinstance(noise, int)):
        raise ConfigError(f"--sweep {path}: noise must be 'official' or an integer seed, got {noise!r}")
    items = list(data.get("samplers") or [])
    product = data.get("product") or {}
    if not isinstance(product, dict) or any(not isinstance(v, list) or not v for v in product.values()):
        raise ConfigError(f"--sweep {path}: product must map SamplerConfig fields to non-empty lists")
    keys = list(product)
    items += [dict(zip(keys, vals)) for vals in itertools.product(*(product[k] for k in keys))] if keys else []
    if not items:
        raise ConfigError(f"--sweep {path}: no sampler configs (give samplers: and/or product:)")
    samplers = []
    for i, item in enumerate(items):
        try:
            s = SamplerConfig.from_dict(item)
        except ConfigError as e:
            raise ConfigError(f"--sweep {path}, sampler {i} ({item}): {e}") from None
        if s not in samplers:
            samplers.append(s)
    return Sweep(ref, utt, noise, bool(data.get("vocoder", True)), samplers)


# ----------------------------------------------------------------------------- model + inputs
def load_flow(model_dir: Path):
    """(ModelConfig, flow params, folded HiFT params) of a release or converted directory (a release
    is read for the flow and HiFT only: no LM, tokenizer or CAM++ conversion, nothing cached)."""
    from cosyvoice2_jax import flow, hift
    from cosyvoice2_jax.layers.conv import fold_weight_norm
    from cosyvoice2_jax.pipeline.loading import is_converted, read_converted
    from cosyvoice2_jax.pipeline.release import check_release_dir, config_from_release_yaml

    if is_converted(model_dir):
        loaded = read_converted(model_dir)
        return loaded.config, loaded.params["flow"], fold_weight_norm(loaded.params["hift"])
    paths = check_release_dir(model_dir)
    cfg = config_from_release_yaml(paths.yaml)
    cfg = dataclasses.replace(cfg, flow=flow.config_from_release(paths.file("flow"), cfg.flow))  # a distilled student
    return (cfg, flow.from_release(paths.file("flow"), cfg.flow),
            hift.from_release(paths.file("hift"), cfg.hift, fold=True))


def make_utterances(u: Utterances, cfg) -> dict[str, np.ndarray]:
    """Random utterances of equal lengths (one batch): tokens, prompt mel (log-mel range), x-vector."""
    r = np.random.default_rng(u.seed)
    fc = cfg.flow
    s0, s1 = u.prompt_tokens, u.tokens
    return {"tokens": r.integers(0, fc.vocab_size, (u.count, s0 + s1)).astype(np.int32),
            "prompt_feat": (r.normal(size=(u.count, fc.token_mel_ratio * s0, fc.output_size)) - 5.0).astype(np.float32),
            "embedding": r.normal(size=(u.count, fc.spk_embed_dim)).astype(np.float32),
            "prompt_frames": np.int32(fc.token_mel_ratio * s0)}


def packed_inputs(cfg, utt) -> dict:
    """The utterances as ``flow.modeling.packed_estimate`` takes them (every token reads and
    produces frames; the prompt mel covers the first ``prompt_frames``)."""
    import jax.numpy as jnp

    tok = utt["tokens"]
    B, S = tok.shape
    F = cfg.flow.token_mel_ratio * S
    pf = np.zeros((B, F, cfg.flow.output_size), np.float32)
    pf[:, : utt["prompt_frames"]] = utt["prompt_feat"]
    full = jnp.full((B,), S, jnp.int32)
    return {"tokens": jnp.asarray(tok), "in_len": full, "out_len": full,
            "prompt_mel_len": jnp.full((B,), int(utt["prompt_frames"]), jnp.int32), "prompt_feat": jnp.asarray(pf),
            "embedding": jnp.asarray(utt["embedding"])}


def make_estimate(params, cfg, inputs, arrays=None, structure=None):
    """``estimate(x_rows, t, k, state)`` of the offline flow (``flow.modeling.packed_estimate``, the
    set-up ``inference_batch`` solves): rows ``[x; x]`` get ``[cond; 0]`` (CFG), rows ``x`` get ``cond``.
    ``arrays``/``structure``: the sampler's, read by a distilled student's extra inputs only."""
    from cosyvoice2_jax.flow.modeling import packed_estimate

    est = packed_estimate(params, cfg.flow, **inputs, arrays=arrays, structure=structure)
    return lambda x_rows, t, k, state: (est(x_rows, t, k, None)[0], state)


# ----------------------------------------------------------------------------- metrics
def log_spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 960, hop: int = 240) -> float:
    """Mean over frames of the RMS (over frequency) difference of the log power spectra, in dB."""
    import librosa

    sa = np.abs(librosa.stft(a, n_fft=n_fft, hop_length=hop, center=True)) ** 2
    sb = np.abs(librosa.stft(b, n_fft=n_fft, hop_length=hop, center=True)) ** 2
    d = 10.0 * (np.log10(sa + 1e-10) - np.log10(sb + 1e-10))
    return float(np.mean(np.sqrt(np.mean(d * d, axis=0))))


# perceptual metrics (optional extra): audio at `sr` Hz in, one number out; None where undefined
PERCEPTUAL_SR = 16000  # DNSMOS, pocketsphinx and resemblyzer all take 16 kHz


def _to16k(audio: np.ndarray, sr: int) -> np.ndarray:
    import soxr

    return np.clip(soxr.resample(np.asarray(audio, np.float32), sr, PERCEPTUAL_SR), -1.0, 1.0).astype(np.float32)


from cosyvoice2_jax.evaluation import dnsmos  # noqa: E402  (DNSMOS P.835, shared with the evaluation harness)


@functools.lru_cache(maxsize=1)
def _sphinx():
    from pocketsphinx import Decoder

    return Decoder(samprate=PERCEPTUAL_SR, loglevel="FATAL")  # the en-us model of the wheel


def transcribe(audio16k: np.ndarray) -> str:
    """English transcript (pocketsphinx with its bundled en-us acoustic model, dictionary and LM)."""
    dec = _sphinx()
    pcm = (np.clip(audio16k, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    return "" if hyp is None else hyp.hypstr.strip()


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """WER of ``hypothesis`` against ``reference`` (jiwer); None when the reference has no words."""
    import jiwer

    if not reference.split():
        return None
    return float(jiwer.wer(reference, hypothesis or "<empty>"))


@functools.lru_cache(maxsize=1)
def _voice_encoder():
    from resemblyzer import VoiceEncoder

    return VoiceEncoder(device="cpu", verbose=False)


def speaker_similarity(a16k: np.ndarray, b16k: np.ndarray) -> float:
    """Cosine similarity of resemblyzer's (L2-normalised) speaker embeddings of two clips."""
    enc = _voice_encoder()
    ea, eb = enc.embed_utterance(a16k), enc.embed_utterance(b16k)
    return float(np.dot(ea, eb) / (np.linalg.norm(ea) * np.linalg.norm(eb) + 1e-12))


def perceptual_available() -> list[str]:
    """The perceptual metrics whose packages are installed: ``dnsmos``, ``wer``, ``spk_sim``."""
    import importlib.util

    have = lambda *m: all(importlib.util.find_spec(x) is not None for x in m)  # noqa: E731
    return [name for name, mods in (("dnsmos", ("speechmos", "onnxruntime", "librosa", "requests")),
                                    ("wer", ("pocketsphinx", "jiwer")), ("spk_sim", ("resemblyzer", "torch")))
            if have(*mods)]


def perceptual_columns(audio: np.ndarray, ref_audio: np.ndarray, sr: int, metrics: list[str],
                       ref_cache: dict) -> dict:
    """The perceptual columns of one utterance (``ref_cache`` keeps the reference's transcript)."""
    a, r = _to16k(audio, sr), _to16k(ref_audio, sr)
    out: dict = {}
    if "dnsmos" in metrics:
        out.update(dnsmos(a))
    if "wer" in metrics:
        if "text" not in ref_cache:
            ref_cache["text"] = transcribe(r)
        out["wer"] = word_error_rate(ref_cache["text"], transcribe(a))
    if "spk_sim" in metrics:
        out["spk_sim"] = speaker_similarity(a, r)
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _timed(fn, *args):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _ref_key(s) -> tuple:
    """Samplers with equal keys share one reference ODE (grid matters only for step-indexed guidance)."""
    from cosyvoice2_jax.flow.sampling import step_indexed

    grid = tuple(np.asarray(s.time_grid()).tolist()) if step_indexed(s) else None
    return (s.guidance, s.cfg_rate, s.cfg_schedule, tuple(s.cfg_interval), s.zero_steps, grid)


# ----------------------------------------------------------------------------- the study
def check_same_inputs(cfg, ref_cfg, name: str) -> None:
    """A reference model must take the measured model's inputs (the same utterances are fed to both)."""
    for f in ("vocab_size", "output_size", "spk_embed_dim", "token_mel_ratio"):
        a, b = getattr(cfg.flow, f), getattr(ref_cfg.flow, f)
        if a != b:
            raise ConfigError(f"--reference-model {name}: its flow.{f} is {b}, the measured model's is {a}; "
                              "the reference must be a flow of the same vocabulary, mel and x-vector sizes")


def runnable(cfg, sampler):
    """The sampler as ``cfg``'s flow runs it: a distilled student's through ``resolve_sampler`` (one
    row, the CFG rate fed to its input ``w``), any other flow's unchanged."""
    from cosyvoice2_jax.flow.modeling import resolve_sampler

    return resolve_sampler(cfg.flow, sampler) if cfg.flow.student.enabled else sampler


def run_study(model_dir: Path, sweep: Sweep, *, vmap: bool = False, progress: bool = True,
              loaded=None, perceptual: list[str] | None = None, reference=None,
              ref_cache: dict | None = None) -> list[dict]:
    """One row per sampler (``COLUMNS`` + its config). ``perceptual``: the metrics to compute
    (default: every installed one, :func:`perceptual_available`; needs ``sweep.vocoder``).
    ``reference``: the reference model's :func:`load_flow` triple (default: the measured model);
    ``ref_cache``: a dict that keeps the references of one reference model and sweep between calls
    (several models measured against it)."""
    import jax
    from tqdm import tqdm

    from cosyvoice2_jax.flow import cfm
    from cosyvoice2_jax.flow import sampling as S

    cfg, flow_params, hift_params = loaded or load_flow(model_dir)
    rcfg, rparams, rhift = reference or (cfg, flow_params, hift_params)
    utt = make_utterances(sweep.utterances, cfg)
    metrics = perceptual_available() if perceptual is None else list(perceptual)
    cond = packed_inputs(cfg, utt)
    B, n_tok = cond["tokens"].shape
    F = cfg.flow.token_mel_ratio * n_tok
    noise = "official" if sweep.noise == "official" else jax.random.key(int(sweep.noise))
    z = cfm.initial_noise(noise, B, F, cfg.flow.output_size)
    n0 = int(utt["prompt_frames"])

    @functools.partial(jax.jit, static_argnames=("structure", "cfg"))
    def run(params, cond, z, arrays, structure, cfg):
        return S.sample_arrays(make_estimate(params, cfg, cond, arrays, structure), z, structure, arrays)[0]

    @functools.partial(jax.jit, static_argnames=("structure",))
    def run_many(params, cond, z, arrays, structure):
        if cfg.flow.student.enabled:  # the student's inputs read each config's arrays
            def one(a):
                return S.sample_arrays(make_estimate(params, cfg, cond, a, structure), z, structure, a)[0]
        else:
            est = make_estimate(params, cfg, cond)  # the encoder runs once, outside the vmap
            one = lambda a: S.sample_arrays(est, z, structure, a)[0]  # noqa: E731
        return jax.vmap(one)(arrays)

    ref = sweep.reference

    @functools.partial(jax.jit, static_argnames=("guidance", "indexed", "cfg"))
    def run_ref(params, cond, z, arrays, guidance, indexed, cfg):
        # a student's reference: its instantaneous velocity (step size d = 0), k = the grid step
        field, grid = S.reference_field(make_estimate(params, cfg, cond, arrays, ("reference",)), guidance, arrays)
        return S.reference_solve(field, z, rtol=ref.rtol, atol=ref.atol, solver=ref.solver,
                                 grid=grid if indexed else None, max_steps=ref.max_steps)

    vocoder = ref_vocoder = None
    if sweep.vocoder:
        from cosyvoice2_jax.hift.runtime import Vocoder

        vocoder = Vocoder(cfg.hift, hift_params)
        ref_vocoder = vocoder if reference is None else Vocoder(rcfg.hift, rhift)
    keys = [jax.random.key(1000 + b) for b in range(B)]

    def audio(mel, voc):
        return voc([np.asarray(m[n0:]) for m in mel], keys)[0]

    def ref_key(s) -> tuple:
        return ("sampler",) if ref.sampler is not None else _ref_key(s)

    # references, one per distinct ODE (or the one fixed sampler's output)
    refs: dict[tuple, dict] = {} if ref_cache is None else ref_cache
    samplers = sweep.samplers
    todo = {ref_key(s) for s in samplers} - set(refs)
    bar = tqdm(total=len(samplers) + len(todo), disable=not progress, desc="flow study", unit="solve")
    for s in samplers:
        k = ref_key(s)
        if k in refs:
            continue
        if ref.sampler is not None:
            rs = runnable(rcfg, ref.sampler)
            x_ref = run(rparams, cond, z, S.guidance_arrays(rs), rs.structure, rcfg)
            ref_nfe = S.n_evals(rs)
        else:
            indexed = S.step_indexed(s)
            # a t-only ODE: one-step arrays, so every reference of this guidance shares one program
            ode = runnable(rcfg, s if indexed else dataclasses.replace(s, steps=1, grid="uniform", times=(),
                                                                      retime="none"))
            (x_ref, stats), _ = _timed(run_ref, rparams, cond, z, S.guidance_arrays(ode), ode.guidance, indexed, rcfg)
            if int(stats["num_steps"]) >= ref.max_steps:
                raise CosyVoiceError(f"the adaptive reference hit max_steps={ref.max_steps} for {s.label}; "
                                     "loosen reference.rtol/atol or raise reference.max_steps")
            ref_nfe = int(stats["n_evals"])
        refs[k] = {"mel": np.asarray(x_ref), "nfe": ref_nfe,
                   "audio": audio(np.asarray(x_ref), ref_vocoder) if vocoder else None,
                   "perceptual": [{} for _ in range(B)]}
        bar.update(1)

    # the samplers, as this model runs them: grouped by compiled structure
    plan = {s: runnable(cfg, s) for s in samplers}
    groups: dict[tuple, list] = {}
    for s in samplers:
        groups.setdefault(plan[s].structure, []).append(s)
    mels: dict = {}
    for structure, members in groups.items():
        if vmap:
            _, arrays = S.stack_arrays([plan[s] for s in members])
            _, compile_s = _timed(run_many, flow_params, cond, z, arrays, structure)
            out, wall = _timed(run_many, flow_params, cond, z, arrays, structure)
            for i, s in enumerate(members):
                mels[s] = (np.asarray(out[i]), wall / len(members), compile_s / len(members))
                bar.update(1)
        else:
            for i, s in enumerate(members):  # one compile per structure: the first member pays it
                arrays = S.guidance_arrays(plan[s])
                _, t_first = _timed(run, flow_params, cond, z, arrays, structure, cfg)
                out, wall = _timed(run, flow_params, cond, z, arrays, structure, cfg)
                mels[s] = (np.asarray(out), wall, max(t_first - wall, 0.0) if i == 0 else 0.0)
                bar.update(1)
    bar.close()

    official = S.SamplerConfig()
    rows = []
    for s in samplers:
        mel, wall, comp = mels[s]
        r = refs[ref_key(s)]
        d = mel[:, n0:] - r["mel"][:, n0:]
        lsd, perc = None, {}
        if vocoder:
            a = audio(mel, vocoder)
            lsd = float(np.mean([log_spectral_distance(x, y) for x, y in zip(a, r["audio"])]))
            if metrics:
                per = [perceptual_columns(x, y, cfg.sample_rate, metrics, rc)
                       for x, y, rc in zip(a, r["audio"], r["perceptual"])]
                perc = {k: _mean(p.get(k) for p in per) for k in per[0]}
        run_s = plan[s]
        rows.append({"label": s.label, "solver": s.solver, "grid": s.grid, "retime": s.retime,
                     "guidance": s.guidance, "cfg_rate": s.cfg_rate, "steps": s.steps, "nfe": S.n_evals(run_s),
                     "rows": S.rows(run_s), "estimator_passes": S.estimator_passes(run_s),
                     "mel_l1": float(np.mean(np.abs(d))), "mel_max_abs": float(np.max(np.abs(d))), "lsd_db": lsd,
                     **{c: perc.get(c) for c in ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "wer", "spk_sim")},
                     "wall_s": round(wall, 5), "compile_s": round(comp, 3), "ref_nfe": r["nfe"],
                     "official": s == official and not cfg.flow.student.enabled, "model": Path(model_dir).name,
                     "reference": ref.label, "config": dataclasses.asdict(s)})
    return rows


# ----------------------------------------------------------------------------- outputs
def family(row: dict, with_model: bool = False) -> str:
    c = row["config"]
    g = row["grid"] + (f">{row['retime']}" if row["retime"] not in ("none", "linear") else "")
    gd = row["guidance"] + ("" if row["guidance"] == "none" else f" w={row['cfg_rate']:g}")
    if c["cfg_schedule"]:
        gd += " sched"
    if tuple(c["cfg_interval"]) != (0.0, 1.0):
        gd += f" t∈{list(c['cfg_interval'])}"
    if c["zero_steps"]:
        gd += f" zero{c['zero_steps']}"
    name = f"{row['solver']} / {g} / {gd}"
    return f"{row['model']}: {name}" if with_model else name


def plot_pareto(rows: list[dict], path: Path, title: str, reference: str = "adaptive reference of the same ODE"
                ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list] = {}
    with_model = len({r.get("model") for r in rows}) > 1
    for r in rows:
        fams.setdefault(family(r, with_model), []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>PX*h"
    for i, (name, rs) in enumerate(sorted(fams.items())):
        rs = sorted(rs, key=lambda r: r["estimator_passes"])
        ax.plot([r["estimator_passes"] for r in rs], [max(r["mel_l1"], 1e-12) for r in rs], label=name,
                color=colors[i % len(colors)], marker=markers[i % len(markers)], alpha=0.85)
    off = [r for r in rows if r["official"]]
    if off:
        ax.scatter([off[0]["estimator_passes"]], [max(off[0]["mel_l1"], 1e-12)], marker="*", s=250, c="none",
                   edgecolors="k", zorder=5,
                   label="official (10 Euler, cosine, CFG 0.7)")
        ax.axhline(off[0]["mel_l1"], color="k", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("estimator passes per utterance (NFE x rows; CFG = 2 rows)")
    ax.set_ylabel(f"mel L1 error vs {reference} (log-mel units)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    _write(out / "results.csv", buf.getvalue())
    _write(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1, ensure_ascii=False))
    plot_pareto(rows, out / "pareto.png", f"Flow samplers: error vs cost ({meta['model']})",
                meta.get("reference_label", "adaptive reference of the same ODE"))


def best_table(rows: list[dict]) -> str:
    """Markdown: configs at least as accurate as the official sampler, cheapest first."""
    off = [r for r in rows if r["official"]]
    lines = ["| sampler | passes | mel L1 | max abs | LSD dB |", "|---|---:|---:|---:|---:|"]
    target = off[0]["mel_l1"] if off else float("inf")
    for r in sorted(rows, key=lambda r: (r["mel_l1"] > target, r["estimator_passes"], r["mel_l1"])):
        lsd = "" if r["lsd_db"] is None else f"{r['lsd_db']:.3f}"
        mark = " (official)" if r["official"] else ""
        name = f"{r['model']}: {r['label']}" if len({x.get("model") for x in rows}) > 1 else r["label"]
        lines.append(f"| {name}{mark} | {r['estimator_passes']} | {r['mel_l1']:.2e} "
                     f"| {r['mel_max_abs']:.2e} | {lsd} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, action="append",
                    help="release or converted directory; repeat it to measure several models in one study")
    ap.add_argument("--reference-model", type=Path,
                    help="measure against this model's reference output (release or converted directory)")
    ap.add_argument("--sweep", type=Path, required=True, help="sweep YAML (see the script's docstring)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    ap.add_argument("--overwrite", action="store_true", help="replace results.* / pareto.png in --out")
    ap.add_argument("--vmap", action="store_true", help="one vmapped program per sampler structure")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--no-perceptual", action="store_true",
                    help="skip the perceptual columns even where their packages are installed")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        names = ("results.csv", "results.json", "pareto.png")
        if args.out.exists() and any((args.out / n).exists() for n in names) and not args.overwrite:
            raise ConfigError(f"--out {args.out} already holds study results; pass --overwrite or pick a new directory")
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        metrics = [] if args.no_perceptual or not sweep.vocoder else perceptual_available()
        reference = ref_cache = None
        if args.reference_model is not None:
            reference, ref_cache = load_flow(args.reference_model), {}
        rows = []
        for model_dir in args.model_dir:
            loaded = load_flow(model_dir)
            if reference is not None:
                check_same_inputs(loaded[0], reference[0], str(args.reference_model))
            rows += run_study(model_dir, sweep, vmap=args.vmap, progress=not args.quiet, perceptual=metrics,
                              loaded=loaded, reference=reference, ref_cache=ref_cache)
        ref_label = sweep.reference.label if sweep.reference.sampler is not None else "adaptive reference"
        if args.reference_model is not None:
            ref_label = f"{args.reference_model.name} {ref_label}"
        elif sweep.reference.sampler is None:
            ref_label += " of the same ODE"
        meta = {"model": ", ".join(d.name for d in args.model_dir), "model_dir": [str(d) for d in args.model_dir],
                "reference_model": None if args.reference_model is None else str(args.reference_model),
                "reference_label": ref_label, "sweep": str(args.sweep),
                "reference": dataclasses.asdict(sweep.reference), "utterances": dataclasses.asdict(sweep.utterances),
                "noise": sweep.noise, "vmap": args.vmap, "total_s": round(time.perf_counter() - t0, 2),
                "load_avg": os.getloadavg()[0], "perceptual": metrics}
        write_outputs(args.out, rows, meta)
    except CosyVoiceError as e:
        print(f"flow_study: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(best_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
