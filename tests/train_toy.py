"""A small token->mel regression objective for exercising the trainer (mesh, resume, checkpoints).

Not a CosyVoice model: it stands in for the real objectives so trainer mechanics are tested on
their own; the real LM/flow/HiFT objectives have their own tests.
"""
from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp


class TokenToMel(nn.Module):
    dim: int = 16

    @nn.compact
    def __call__(self, tokens):
        emb = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.1), ("vocab", "embed")),
                         (6561, self.dim))
        h = jnp.take(emb, tokens, axis=0)
        h = nn.Dense(64, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(h)
        h = jax.nn.gelu(h)
        return nn.Dense(160, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(h)


class ToyObjective:
    name = "toy"

    def __init__(self):
        self.model = TokenToMel()

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, 4), jnp.int32))["params"]

    def loss_fn(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch["speech_token"])  # (B, T, 160)
        B, T, _ = out.shape
        pred = out.reshape(B, 2 * T, 80)
        mask = (jnp.arange(2 * T)[None] < batch["speech_feat_len"][:, None]).astype(pred.dtype)
        noise = 0.01 * jax.random.normal(rng, pred.shape)  # uses the step key: resume must reproduce it
        err = ((pred + noise - batch["speech_feat"]) ** 2).mean(-1) * mask
        loss = err.sum() / jnp.maximum(mask.sum(), 1.0)
        return loss, {"frames": mask.sum()}


def main():  # worker process for the SIGKILL resume test
    sys.path.insert(0, str(Path(__file__).parent))
    import json

    from cosyvoice2_jax.train import data as D
    from cosyvoice2_jax.train import trainer as TR
    from cosyvoice2_jax.train.optim import OptimConfig

    args = json.loads(sys.argv[1])
    dcfg = D.DataConfig(**args["data"])
    state = TR.resume_data_state(args["workdir"])
    data = D.TrainData(dcfg, lambda t: list(t.encode())[:60], state=state)
    cfg = TR.TrainConfig(steps=args["steps"], save_every=args["save_every"], log_every=1, workdir=args["workdir"],
                         optim=OptimConfig(lr=3e-3), async_save=False)
    TR.train(ToyObjective(), data, cfg, progress=False)


if __name__ == "__main__":
    main()
