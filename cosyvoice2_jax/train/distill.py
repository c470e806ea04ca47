"""Few-step flow distillation objective (``objective: distill``, ``configs/train/distill_*.yaml``).

Params are ``{"student": ..., "teacher": ...}``: the teacher is the frozen flow given as
``init_from`` (a release directory or ``flow.pt``; random only in tests), the student starts as
the teacher plus its zero-effect extra inputs (:func:`cosyvoice2_jax.flow.distill.student_from_teacher`);
:meth:`DistillObjective.trainable` marks only the student, so the optimizer keeps no state for the
teacher and never moves it. Losses: :mod:`cosyvoice2_jax.flow.distill`. Data: the flow training
shards (tokens, mel, x-vector), with the flow objective's prompt prefix and attention masks
(official chunk-or-full coin, so the student streams like the teacher).

After training, :func:`export_student` writes a release directory whose ``flow.pt`` is the
student (extra keys documented in ``flow/params.py``); the pipeline and CLI load it like any
release (``cosyvoice2-jax synth --model-dir OUT``) and run its 1-2 step sampler.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ..config import FlowConfig
from ..flow import cfm as cfm_lib
from ..flow import distill as D
from ..flow import modeling as F
from ..flow.params import param_axes as flow_param_axes
from ..layers.masks import valid_mask
from .flow import unpack_batch


@dataclasses.dataclass
class DistillObjective:
    teacher_cfg: FlowConfig
    options: D.DistillOptions = D.DistillOptions()
    init_from: Any = None  # the teacher's params (else random: tests)
    name: str = "distill"

    def __post_init__(self):
        self.cfg = D.student_config(self.teacher_cfg, self.options)

    def init_params(self, rng):
        kt, ks = jax.random.split(rng)
        teacher = self.init_from if self.init_from is not None else F.init_params(self.teacher_cfg, kt)
        return {"student": D.student_from_teacher(teacher, F.init_params(self.cfg, ks)), "teacher": teacher}

    def param_axes(self):
        return {"student": flow_param_axes(self.cfg), "teacher": flow_param_axes(self.teacher_cfg)}

    @staticmethod
    def trainable(params):
        return {"student": jax.tree.map(lambda _: True, params["student"]),
                "teacher": jax.tree.map(lambda _: False, params["teacher"])}

    # ---- the flow's conditioning and estimator calls
    def _inputs(self, params, cfg, batch, tok_len, chunk):
        model = F.CausalMaskedDiffWithXvec(cfg)
        p = {"params": params}
        S = batch["speech_token"].shape[1]
        spk = model.apply(p, batch["embedding"], method=model.embed_speaker)
        mu, valid_f = model.apply(p, batch["speech_token"], valid_mask(tok_len, S), chunk, method=model.encode)
        return model, p, mu, valid_f, spk

    def loss_fn(self, params, batch, rng):
        o, cfg_s = self.options, self.cfg
        kd, km, kt, kw = jax.random.split(rng, 4)
        feat, feat_len, tok_len, draws, chunk = unpack_batch(cfg_s, batch, kd, km)
        B, Fr = feat.shape[:2]
        dec_chunk = chunk * cfg_s.token_mel_ratio
        cond = feat * valid_mask(draws["prompt_len"], Fr)[..., None].astype(feat.dtype)
        teacher = jax.lax.stop_gradient(params["teacher"])
        tm, tp, mu_t, valid_f, spk_t = self._inputs(teacher, self.teacher_cfg, batch, tok_len, chunk)
        sm, sp, mu_s, _, spk_s = self._inputs(params["student"], cfg_s, batch, tok_len, chunk)
        sigma = cfg_s.cfm.sigma_min

        def teacher_v(y, t, w):  # CFG velocity, conditioned and unconditioned rows in one batch
            two = lambda a: jnp.concatenate([a, jnp.zeros_like(a)], axis=0)  # noqa: E731
            v2 = tm.apply(tp, jnp.concatenate([y, y]), jnp.concatenate([valid_f, valid_f]), two(mu_t),
                          jnp.concatenate([t, t]), two(spk_t), two(cond), jnp.concatenate([dec_chunk, dec_chunk]),
                          method=tm.estimate)
            vc, vu = jnp.split(v2, 2, axis=0)
            return D.cfg_combine(vc, vu, w)

        def student_v(y, t, extra=None):
            return sm.apply(sp, y, valid_f, mu_s, t, spk_s, cond, dec_chunk, extra, method=sm.estimate)

        w_t = jnp.full((B,), o.teacher_cfg_rate, jnp.float32)

        def teacher_sample(z):  # the teacher's sampler (Euler, its grid, CFG teacher_cfg_rate) from z
            ts = cfm_lib.t_span(o.teacher_steps, self.teacher_cfg.cfm.t_scheduler)
            return jax.lax.stop_gradient(D.euler_solve(lambda x, t_: teacher_v(x, t_, w_t), z, ts))
        metrics = {"frames": jnp.sum(feat_len).astype(jnp.float32)}
        if o.method == "guidance":
            t = cfm_lib.schedule(draws["t_u"], cfg_s.cfm.t_scheduler)
            w = o.w_range[0] + (o.w_range[1] - o.w_range[0]) * jax.random.uniform(kw, (B,))
            y = D.interpolate(draws["z"], feat, t, sigma)
            loss = D.guidance_loss(lambda y_, t_, w_: student_v(y_, t_, {"w": w_}), teacher_v, y, t, w, valid_f)
        elif o.method == "meanflow":
            t, r = D.draw_times(kt, B, o)
            x1 = teacher_sample(draws["z"]) if o.teacher_couplings else feat
            y = D.interpolate(draws["z"], x1, t, sigma)
            v = jax.lax.stop_gradient(teacher_v(y, t, w_t))
            loss = D.meanflow_loss(lambda y_, t_, r_: student_v(y_, t_, {"d": r_ - t_}), v, y, t, r, valid_f)
            metrics["step_frac"] = jnp.mean((r > t).astype(jnp.float32))
        else:  # reflow: couplings from the teacher's sampler (on the fly) or cached in the batch
            if "teacher_mel" in batch:
                z, x1 = batch["teacher_noise"], batch["teacher_mel"]
            else:
                z = draws["z"]
                x1 = teacher_sample(z)
            t, _ = D.draw_times(kt, B, dataclasses.replace(o, flow_ratio=0.0))
            loss = D.reflow_loss(lambda y_, t_: student_v(y_, t_), z, x1, t, valid_f, sigma)
        return loss, metrics


def export_student(params: dict, student_cfg: FlowConfig, release_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``: a copy of the release ``release_dir`` whose ``flow.pt`` is the student
    (:func:`cosyvoice2_jax.flow.to_release` with the ``student.*`` keys). Refuses to overwrite an
    existing ``out_dir``; written to a temporary directory, then renamed."""
    from ..errors import ConfigError
    from ..flow import to_release
    from ..torch_pt import save_pt

    src, out = Path(release_dir), Path(out_dir)
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new output directory (nothing is overwritten)")
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("flow.pt"))
    save_pt({k: jax.device_get(v) for k, v in to_release(params, student_cfg).items()}, tmp / "flow.pt")
    tmp.rename(out)
    return out


def restore_student(workdir: str | Path, objective: DistillObjective, optim_cfg, step: int | None = None) -> dict:
    """The student params of the Orbax checkpoint in ``workdir/checkpoints`` (latest step unless
    ``step``), restored through the trainer's abstract state."""
    from .. import sharding as M
    from .checkpoint import Checkpointer
    from .optim import make_optimizer
    from .trainer import abstract_state, with_trainable_mask

    mesh = M.make_mesh(M.MeshConfig())
    tx = with_trainable_mask(objective, make_optimizer(optim_cfg))
    abstract, shardings = abstract_state(objective, tx, mesh)
    with Checkpointer(Path(workdir) / "checkpoints", async_save=False) as ck:
        state, _, _ = ck.restore(step, abstract, shardings)
    return state["params"]["student"]
