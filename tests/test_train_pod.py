"""Multi-process (pod) training, proven on this machine: 2 processes x 4 CPU devices (gloo
collectives, coordinator on 127.0.0.1) run the real CLI with the README's launch recipes, read from
README.md (the local one: ``--coordinator --num-processes --process-id``; the SLURM one:
``--distributed`` under a faked srun environment), and must equal 1 process x 8 devices; a SIGKILLed
2-process run resumes to the uninterrupted curve; checkpoints move between 1 and 2 processes. The
fast tests check the row split (no row is read twice), the global batch assembly, the config/mesh
errors in one process and that the README's three recipes are one command.

The multi-process tests are ``slow``: on the 2-core CI machine under load ~15 they took 36 min
together (LM 1+2-process reference runs 9.7 min, flow 16.7 min, SIGKILL/resume 5.7 min, checkpoints
across process counts 3.9 min); at load ~25 the three LM tests took 32.9 min (reference runs 18.0,
SIGKILL/resume with the SLURM recipe 11.4, checkpoints 3.2); the fast ones take ~10 s.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cosyvoice2_jax.errors import ConfigError
from toy_tokenizer import write_toy_qwen_tokenizer
from cosyvoice2_jax.train import data as D
from cosyvoice2_jax.train import distributed as DIST
from cosyvoice2_jax import sharding as M
from cosyvoice2_jax.train import trainer as TR
from test_train_data import make_shards

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 20, 5


def _tok(t):
    return list(t.encode())[:60]


# ----------------------------------------------------------------------------------- fast, one process
class CountingSource(D.ParquetSource):
    def __init__(self, shards):
        super().__init__(shards)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


def test_processes_read_disjoint_rows(tmp_path):
    """Two processes' shares over 3 epochs: within each epoch every planned row is loaded by
    exactly one process (the global shuffle moves rows between processes across epochs, as a
    distributed sampler does), each process's rows are its half of the single-process batch, and
    resume works per process."""
    lst, _ = make_shards(tmp_path, n_rows=20, n_shards=2, seed=3)
    cfg = D.DataConfig(data_list=str(lst), need_mel=False, max_frames_in_batch=600, token_buckets=(150,),
                       text_buckets=(64,), batch_multiple=4, sort_window=8, num_threads=1, min_length=50)
    shards = D.read_data_list(lst)
    full = D.TrainData(cfg, _tok, source=CountingSource(shards))
    procs = [D.TrainData(cfg, _tok, source=CountingSource(shards), process_block=(p, p + 2, 4)) for p in (0, 2)]
    n_batches = full.batches_per_epoch()
    assert n_batches >= 2
    seen = [0, 0]
    for epoch in range(3):
        whole = [next(full) for _ in range(n_batches)]
        halves = [[next(d) for _ in range(n_batches)] for d in procs]
        # rows loaded in this epoch (all batches consumed: prefetching cannot reach the next epoch)
        reads = [d.source.read[seen[p]:] for p, d in enumerate(procs)]
        seen = [len(d.source.read) for d in procs]
        planned = sorted(i for b in D.plan_epoch(full.source.token_len, cfg, epoch) for i in b if i >= 0)
        assert not set(reads[0]) & set(reads[1]), epoch
        assert sorted(reads[0] + reads[1]) == planned, epoch
        assert min(len(reads[0]), len(reads[1])) > 0
        for p in (0, 1):  # each process's rows are the matching half of the single-process batch
            for w, h in zip(whole, halves[p]):
                rows = w["valid"].shape[0] // 2
                for k, v in h.items():
                    part = w[k][p * rows: (p + 1) * rows]
                    if v.ndim >= 2:  # the process's own bucket may be shorter; global_batch pads it
                        assert not np.any(part[:, v.shape[1]:])
                        part = part[:, : v.shape[1]]
                    np.testing.assert_array_equal(v, part, err_msg=k)
    # exact resume of one process from its own state
    d = D.TrainData(cfg, _tok, source=CountingSource(shards), process_block=(2, 4, 4))
    for _ in range(n_batches + 1):
        next(d)
    again = D.TrainData(cfg, _tok, source=CountingSource(shards), state=d.state(), process_block=(2, 4, 4))
    a, b = next(d), next(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(D.DataError, match="batch_multiple"):
        odd = D.DataConfig(**{**cfg.__dict__, "batch_multiple": 1, "max_frames_in_batch": 300})
        next(D.TrainData(odd, _tok, source=CountingSource(shards), process_block=(0, 1, 2)))


def test_global_batch_single_process_is_shard_batch():
    mesh = M.make_mesh((4, 2, 1))
    assert DIST.process_batch_block(mesh) == (0, 8, 8)
    b = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "n": np.arange(16, dtype=np.int32)}
    g = DIST.global_batch(b, mesh)
    for k in b:
        np.testing.assert_array_equal(np.asarray(g[k]), b[k])
        assert g[k].sharding == M.batch_sharding(mesh, b[k].ndim)


def test_config_and_mesh_errors():
    a = {"train": {"steps": 20, "mesh": {"data": -1}}, "data": {"seed": 0}}
    DIST.check_same_config(a, [a, json.loads(json.dumps(a))])
    b = {"train": {"steps": 30, "mesh": {"data": -1}}, "data": {"seed": 0}}
    with pytest.raises(ConfigError, match=r"process 1 differs from process 0 in train.steps: 20 vs 30"):
        DIST.check_same_config(a, [a, b])
    DIST.check_mesh(M.MeshConfig(-1, 2, 1), n_devices=8, n_processes=2)
    DIST.check_mesh(M.MeshConfig(2, 1, 1), n_devices=8, n_processes=1)  # a smaller mesh in one process
    with pytest.raises(ConfigError, match=r"2 processes x 4 local devices = 8 devices.*exactly 8"):
        DIST.check_mesh(M.MeshConfig(2, 2, 1), n_devices=8, n_processes=2)
    with pytest.raises(ConfigError, match="divisor of 8"):
        DIST.check_mesh(M.MeshConfig(-1, 3, 1), n_devices=8, n_processes=2)
    with pytest.raises(ConfigError, match="--num-processes"):
        DIST.initialize("127.0.0.1:1", None, 0)
    with pytest.raises(ConfigError, match="outside 0..1"):
        DIST.initialize("127.0.0.1:1", 2, 2)
    # the saved per-process data states: own entry, or the common one on another process count
    saved = {"epoch": 1, "grain": {"i": 3}, "processes": [{"epoch": 1, "grain": {"i": 3}}] * 2}
    assert TR.data_state_for_process(saved, 1, 2) == {"epoch": 1, "grain": {"i": 3}}
    assert TR.data_state_for_process(saved, 0, 1) == {"epoch": 1, "grain": {"i": 3}}
    saved["processes"] = [{"epoch": 1, "grain": {"i": 3}}, {"epoch": 1, "grain": {"i": 4}}]
    with pytest.raises(ConfigError, match="resume with 2 processes"):
        TR.data_state_for_process(saved, 0, 1)


# ----------------------------------------------------------------------------------- the real thing
def _free_port(slurm: bool = False) -> int:
    """A free loopback port; ``slurm``: one in the range jax derives from SLURM_JOB_ID."""
    for port in (np.random.default_rng().permutation(4096) + 61440 if slurm else [0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def pod_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    lst, _ = make_shards(root, n_rows=16, n_shards=2, seed=5)
    tok = write_toy_qwen_tokenizer(root / "tok")
    return root, lst, tok


def _config(root: Path, lst, tok, objective: str) -> Path:
    # LM: two text buckets, so the processes' own buckets differ and global_batch must agree on one;
    # held-out eval on global batches. Flow: one batch shape and no eval (its compiles are the slow part)
    spec = {"objective": objective, "model": "tiny", "tokenizer_dir": str(tok) if objective == "lm" else "",
            "eval_data_list": str(lst) if objective == "lm" else "",
            "data": {"data_list": str(lst), "max_frames_in_batch": 900, "token_buckets": [150],
                     "text_buckets": [32, 64] if objective == "lm" else [64], "sort_window": 8, "num_threads": 1,
                     "min_length": 50, "need_mel": objective == "flow"},
            "train": {"steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 10, "log_every": 1,
                      "async_save": False, "keep": 10, "optim": {"lr": 2e-3}}}
    path = root / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def readme_recipes() -> dict[str, list[str]]:
    """The README's pod launch commands (local, slurm, tpu) as argv after ``cosyvoice2-jax``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    sec = text[text.index("### Multi-process (pod) training"):]
    sec = sec[: sec.index("\n## ")]
    blocks = [b.split("```", 1)[0] for b in sec.split("```bash\n")[1:]]
    out = {}
    for name, marker in (("local", "--coordinator"), ("slurm", "srun "), ("tpu", "gcloud ")):
        (block,) = [b for b in blocks if marker in b]
        joined = block.replace("\\\n", " ")
        line = joined[joined.index("cosyvoice2-jax train"):].split("\n", 1)[0]
        argv = shlex.split(line.rstrip().rstrip("&").rstrip('"'))
        out[name] = argv[1:]
    return out


def _recipe_argv(recipe: str, config, workdir, lst, tok, port: int, i: int, nproc: int) -> list[str]:
    """A README recipe with this test's paths, port and process id put in; nothing else changes."""
    src, argv = readme_recipes()[recipe], []
    it = iter(src)
    for a in it:
        if a == "--config":
            next(it)
            argv += [a, str(config)]
        elif a == "--coordinator":
            assert next(it).startswith("127.0.0.1:")
            argv += [a, f"127.0.0.1:{port}"] if nproc > 1 else []
        elif a == "--num-processes":
            assert next(it) == "2"
            argv += [a, str(nproc)] if nproc > 1 else []
        elif a == "--process-id":
            assert next(it) == "$i"
            argv += [a, str(i)] if nproc > 1 else []
        elif a.startswith("data.data_list="):
            argv.append(f"data.data_list={lst}")
        elif a.startswith("tokenizer_dir="):
            argv.append(f"tokenizer_dir={tok}")
        elif a.startswith("train.workdir="):
            argv.append(f"train.workdir={workdir}")
        else:
            argv.append(a)
    return argv


def test_readme_recipes_are_one_command():
    """The SLURM and TPU recipes are the same command (paths aside); the local one adds the explicit
    coordinator; all three are sized for the 2-process x 4-device runs below."""
    r = readme_recipes()
    same = _recipe_argv("slurm", Path("c"), Path("w"), Path("l"), Path("t"), 0, 0, 2)
    assert _recipe_argv("tpu", Path("c"), Path("w"), Path("l"), Path("t"), 0, 0, 2) == same
    local = _recipe_argv("local", Path("c"), Path("w"), Path("l"), Path("t"), 9, 1, 2)
    assert [a for a in same if a != "--distributed"] == local[:-6]
    assert local[-6:] == ["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "1"]
    assert local[:3] == ["train", "--config", "c"] and all(isinstance(a, str) for a in local)
    for k in ("data.batch_multiple=8", "train.mesh.data=-1", "train.mesh.fsdp=2"):
        assert all(k in v for v in r.values()), k


def _launch(config: Path, workdir: Path, nproc: int, log: Path, recipe: str = "local") -> list[subprocess.Popen]:
    """A README recipe: the same command in every process, 8 // nproc CPU devices each. ``slurm``:
    ``--distributed`` under the environment srun gives each task (coordinator on 127.0.0.1)."""
    spec = yaml.safe_load(config.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
           and not k.startswith("SLURM_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // nproc}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    port = _free_port(slurm=recipe == "slurm")
    procs = []
    for i in range(nproc):
        argv = _recipe_argv(recipe, config, workdir, spec["data"]["data_list"], spec["tokenizer_dir"], port, i, nproc)
        penv = dict(env)
        if recipe == "slurm":  # jax's SlurmCluster: coordinator = first node, port 61440 + job id % 4096
            penv.update(SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(nproc),
                        SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES=str(nproc))
        out = open(f"{log}.{i}.log", "w")
        procs.append(subprocess.Popen(["nice", "-n", "5", sys.executable, "-m", "cosyvoice2_jax.cli"] + argv,
                                      env=penv, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, log: Path, timeout=1800):
    deadline = time.time() + timeout
    for i, p in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rc = "timeout"
        if rc != 0:
            for q in procs:
                q.kill()
            raise AssertionError(f"process {i} exited with {rc}:\n" + Path(f"{log}.{i}.log").read_text()[-3000:])


def _metrics(workdir: Path, split="loss") -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r[split]  # after a resume, later rows of a step replace earlier ones
    return out


def _run(config, workdir, nproc):
    procs = _launch(config, workdir, nproc, workdir.parent / f"{workdir.name}")
    _wait(procs, workdir.parent / f"{workdir.name}")
    return _metrics(workdir)


def _close(a: dict, b: dict, steps=range(1, STEPS + 1), atol=1e-5):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    for s in steps:
        assert abs(a[s] - b[s]) <= atol, (s, a[s], b[s])


def _eval_losses(workdir: Path) -> list[float]:
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted((workdir / "tb").iterdir()):
        raw = f.read_bytes()
        pos = 0
        while pos < len(raw):
            n = int.from_bytes(raw[pos: pos + 8], "little")
            ev = event_pb2.Event.FromString(raw[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            out += [(ev.step, v.simple_value) for v in ev.summary.value if v.tag == "eval/loss"]
    return [v for _, v in sorted(out)]


@pytest.fixture(scope="module")
def lm_runs(pod_data):
    root, lst, tok = pod_data
    cfg = _config(root, lst, tok, "lm")
    one, two = root / "lm_1proc", root / "lm_2proc"
    return cfg, one, _run(cfg, one, 1), two, _run(cfg, two, 2)


@pytest.mark.slow
def test_two_processes_equal_one_lm(lm_runs):
    cfg, one, ref1, two, ref2 = lm_runs
    _close(ref1, ref2)
    assert len(set(ref1.values())) > 10  # a real curve, not a constant
    # logs come from process 0 alone: one row per step, one event file
    assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert len(list((two / "tb").iterdir())) == 1
    e1, e2 = _eval_losses(one), _eval_losses(two)  # held-out loss on global (reduced) batches
    assert len(e1) == len(e2) == 2
    np.testing.assert_allclose(e1, e2, atol=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_flow(pod_data):
    root, lst, tok = pod_data
    cfg = _config(root, lst, tok, "flow")
    _close(_run(cfg, root / "flow_1proc", 1), _run(cfg, root / "flow_2proc", 2))


@pytest.mark.slow
def test_sigkill_one_process_then_resume(lm_runs, pod_data):
    cfg, _, _, _, ref2 = lm_runs
    root = pod_data[0]
    work = root / "lm_killed"
    log = root / "lm_killed"
    procs = _launch(cfg, work, 2, log, recipe="slurm")  # the SLURM recipe (--distributed), vs the local one
    deadline = time.time() + 1800
    m = work / "metrics.jsonl"
    while time.time() < deadline:  # past the second checkpoint
        if m.exists() and len(m.read_text().splitlines()) >= 2 * SAVE_EVERY + 2:
            break
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)  # one host dies ...
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)  # ... and the launcher tears the job down
    procs[0].wait()
    done = len(m.read_text().splitlines())
    assert 2 * SAVE_EVERY <= done < STEPS, done
    _wait(_launch(cfg, work, 2, log, recipe="slurm"), log)  # the same command again, both processes
    _close(_metrics(work), ref2, atol=0.0)


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(lm_runs):
    """Resume a 2-process run's step-10 checkpoint in 1 process, and a 1-process one in 2."""
    cfg, one, ref1, two, ref2 = lm_runs
    for src, ref, nproc in ((two, ref2, 1), (one, ref1, 2)):
        dst = src.parent / f"{src.name}_to_{nproc}"
        shutil.copytree(src, dst)
        for ck in (dst / "checkpoints").iterdir():
            if ck.name.isdigit() and int(ck.name) > 10:
                shutil.rmtree(ck)
        (dst / "metrics.jsonl").write_text("".join(
            line + "\n" for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 10))
        shutil.rmtree(dst / "tb")
        _close(_run(cfg, dst, nproc), ref)


def test_imports_do_not_start_a_jax_backend():
    """jax.distributed.initialize must run before any backend starts: importing the package's
    modules (CLI, trainer, every component) may not touch a device (e.g. jnp arrays at module level)."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, jax._src.xla_bridge as xb, cosyvoice2_jax as P\n"
            "names = [m.name for m in pkgutil.walk_packages(P.__path__, 'cosyvoice2_jax.')\n"
            "         if '.serve.ray_app' not in m.name]\n"
            "started = []\n"
            "for n in names:\n"
            "    importlib.import_module(n)\n"
            "    if xb._backends and not started: started.append(n)\n"
            "print('STARTED', started)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "STARTED []" in out.stdout, f"a module starts the JAX backend at import: {out.stdout}"
