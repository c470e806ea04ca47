"""The evaluation harness of the paper's tables: WER/CER by an ASR model and speaker similarity.

Test lists use the Seed-TTS-eval ``meta.lst`` format, one utterance per line::

    utt_id|prompt_text|prompt_wav|target_text[|ground_truth_wav]

(``prompt_wav`` relative to the list's folder unless absolute). Each row is synthesised in
``zero_shot`` mode (prompt audio + its transcript), then scored:

* **WER / CER** (:func:`error_rate`): the output is transcribed by a pluggable ASR (anything with
  ``transcribe(wavs_16k, language) -> list[str]``; default :class:`~cosyvoice2_jax.whisper.WhisperASR`
  from a local Hugging Face Whisper directory) and compared with the target text after the
  Seed-TTS-eval normalisation (:func:`normalize_text`): punctuation removed (ASCII and Unicode
  ``P*`` classes; the apostrophe is kept), English lower-cased and scored on words (WER),
  Chinese scored on characters (CER). Edit distances by ``jiwer``.
* **SIM** (:func:`cosine`): cosine of speaker embeddings of the prompt and the output (16 kHz),
  from a pluggable embedder (``embed_wavs(wavs_16k) -> (N, D)``; default the release's CAM++,
  :class:`~cosyvoice2_jax.speaker.runtime.SpeakerEncoder`). Seed-TTS-eval's own SIM uses a WavLM
  speaker model: numbers are comparable within this harness, not with the paper's.

* **MOS** (optional, ``mos=True`` / ``--mos``): DNSMOS P.835 (:func:`dnsmos`: ``dnsmos_ovrl``,
  ``dnsmos_sig``, ``dnsmos_bak``, 1..5) of the output by ``speechmos``, whose ONNX models ship inside
  its wheel (nothing downloaded at run time; extra ``perceptual``). ``scripts/flow_study.py`` uses
  the same function.

Summary numbers: ``wer`` is the mean of per-utterance error rates (as Seed-TTS-eval reports),
``wer_corpus`` the total errors over the total reference words/characters, ``sim`` and the MOS
columns plain means (MOS over the clips long enough to score). Results: a per-utterance CSV and a
summary JSON, each written atomically.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import string
import tempfile
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import ConfigError, CosyVoiceError


class EvalListError(CosyVoiceError, ValueError):
    """A test list line is malformed or names a missing file."""


class ASR(Protocol):
    def transcribe(self, wavs_16k: Sequence[np.ndarray], language: str | None) -> list[str]: ...


class SpeakerEmbedder(Protocol):
    def embed_wavs(self, wavs_16k: Sequence[np.ndarray]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------ lists
@dataclasses.dataclass(frozen=True)
class EvalRow:
    utt: str
    prompt_text: str
    prompt_wav: Path
    target_text: str
    gt_wav: Path | None = None


def read_list(path: str | Path) -> list[EvalRow]:
    """Read a Seed-TTS-eval ``meta.lst`` (4 or 5 ``|``-separated fields); checks every file exists."""
    path = Path(path)
    if not path.is_file():
        raise EvalListError(f"test list {path} does not exist")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        f = line.rstrip("\r").split("|")
        if len(f) not in (4, 5):
            raise EvalListError(f"{path}:{n}: expected utt|prompt_text|prompt_wav|target_text[|gt_wav] "
                                f"(4 or 5 fields separated by '|'), got {len(f)}")
        utt, ptext, pwav, ttext = (x.strip() for x in f[:4])
        if not utt or not ttext:
            raise EvalListError(f"{path}:{n}: empty utterance id or target text")
        if utt in seen:
            raise EvalListError(f"{path}:{n}: utterance id {utt!r} appears twice (it names the output files)")
        seen.add(utt)
        wavs = [Path(p) if Path(p).is_absolute() else path.parent / p for p in (pwav, *(f[4:] or []))]
        for w in wavs:
            if not w.is_file():
                raise EvalListError(f"{path}:{n}: audio file {w} does not exist")
        rows.append(EvalRow(utt, ptext, wavs[0], ttext, wavs[1] if len(wavs) > 1 else None))
    if not rows:
        raise EvalListError(f"test list {path} has no rows")
    return rows


# ------------------------------------------------------------------------------------ metrics
_ASCII_PUNCT = set(string.punctuation) - {"'"}


def is_cjk(text: str) -> bool:
    """True when the text has CJK ideographs (scored by characters)."""
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in text)


def language_of(text: str) -> str:
    return "zh" if is_cjk(text) else "en"


def normalize_text(text: str, lang: str) -> str:
    """Seed-TTS-eval normalisation: delete punctuation (keep ``'``; ``well-known`` -> ``wellknown`` as
    there), squeeze spaces; ``en``: lower case,
    words separated by spaces; ``zh``: every non-space character becomes a token."""
    out = "".join(c for c in text
                  if not (c in _ASCII_PUNCT or (unicodedata.category(c).startswith("P") and c != "'")))
    if lang == "zh":
        return " ".join(c for c in out if not c.isspace())
    if lang == "en":
        return " ".join(out.lower().split())
    raise ConfigError(f"language {lang!r}: the harness scores 'en' (WER on words) or 'zh' (CER on characters)")


def error_rate(reference: str, hypothesis: str, lang: str) -> dict[str, float]:
    """Word (``en``) or character (``zh``) error rate of ``hypothesis`` against ``reference`` after
    :func:`normalize_text`: ``{'wer', 'sub', 'del', 'ins', 'n_ref'}`` (``wer`` = (S + D + I) / N)."""
    try:
        import jiwer
    except ImportError:
        raise ConfigError("WER/CER needs the jiwer package: pip install 'cosyvoice2-jax[eval]' (or jiwer)") from None

    ref, hyp = normalize_text(reference, lang), normalize_text(hypothesis, lang)
    if not ref:
        raise EvalListError(f"reference text {reference!r} has no words after normalisation")
    if not hyp:  # everything deleted (jiwer refuses empty hypotheses)
        n = len(ref.split())
        return {"wer": 1.0, "sub": 0, "del": n, "ins": 0, "n_ref": n}
    o = jiwer.process_words(ref, hyp)
    n = o.hits + o.substitutions + o.deletions
    return {"wer": (o.substitutions + o.deletions + o.insertions) / n, "sub": o.substitutions,
            "del": o.deletions, "ins": o.insertions, "n_ref": n}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, D)`` embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


MOS_COLUMNS = ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak")
_DNSMOS_MODULES = ("speechmos", "onnxruntime", "librosa", "requests")  # speechmos imports the others undeclared


def dnsmos_available() -> bool:
    """True when DNSMOS can run (the ``perceptual`` extra is installed)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in _DNSMOS_MODULES)


def require_dnsmos() -> None:
    """Raise a :class:`ConfigError` naming the extra when DNSMOS cannot run."""
    import importlib.util

    missing = [m for m in _DNSMOS_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the MOS columns (DNSMOS) need {', '.join(missing)}: pip install "
                          f"'cosyvoice2-jax[perceptual]' (or drop --mos)")


def dnsmos(audio16k: np.ndarray) -> dict[str, float | None]:
    """DNSMOS P.835 ``{dnsmos_ovrl, dnsmos_sig, dnsmos_bak}`` of one 16 kHz clip (speechmos's bundled
    ONNX models, clip values limited to [-1, 1]; clips under 9 s are repeated to 9 s as DNSMOS does).
    Clips under 0.1 s get None (no score)."""
    require_dnsmos()
    from speechmos import dnsmos as D

    a = np.clip(np.asarray(audio16k, np.float32).reshape(-1), -1.0, 1.0)
    if a.size < 16000 // 10:
        return {c: None for c in MOS_COLUMNS}
    r = D.run(a, sr=16000)
    return {"dnsmos_ovrl": float(r["ovrl_mos"]), "dnsmos_sig": float(r["sig_mos"]), "dnsmos_bak": float(r["bak_mos"])}


def to_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    from .frontend.audio import resample

    w = np.asarray(wav, np.float32).reshape(-1)
    return w if sr == 16000 else resample(w, sr, 16000).astype(np.float32)


@dataclasses.dataclass
class Scorer:
    """WER by ``asr`` and SIM by ``speaker`` of synthesised audio (16 kHz lists in, dict rows out);
    ``mos``: also the DNSMOS columns (:func:`dnsmos`)."""

    asr: ASR
    speaker: SpeakerEmbedder
    mos: bool = False

    def __post_init__(self):
        if self.mos:
            require_dnsmos()

    def score(self, outputs_16k: Sequence[np.ndarray], targets: Sequence[str], refs_16k: Sequence[np.ndarray],
              langs: Sequence[str]) -> list[dict[str, Any]]:
        hyps: list[str] = [""] * len(outputs_16k)
        for lang in sorted(set(langs)):
            idx = [i for i, l in enumerate(langs) if l == lang]
            for i, h in zip(idx, self.asr.transcribe([outputs_16k[i] for i in idx], lang)):
                hyps[i] = h
        emb = np.asarray(self.speaker.embed_wavs(list(outputs_16k) + list(refs_16k)))
        sims = cosine(emb[:len(outputs_16k)], emb[len(outputs_16k):])
        rows = []
        for i, (t, h, lang) in enumerate(zip(targets, hyps, langs)):
            e = error_rate(t, h, lang)
            rows.append({"lang": lang, "hypothesis": h, **e, "sim": float(sims[i]),
                         **(dnsmos(outputs_16k[i]) if self.mos else {})})
        return rows


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Means over rows, overall and per language (see the module docstring)."""
    def agg(rs):
        n_ref = sum(r["n_ref"] for r in rs)
        errs = sum(r["sub"] + r["del"] + r["ins"] for r in rs)
        out = {"n": len(rs), "wer": float(np.mean([r["wer"] for r in rs])), "wer_corpus": errs / max(n_ref, 1),
               "sim": float(np.mean([r["sim"] for r in rs]))}
        for c in MOS_COLUMNS:
            if any(c in r for r in rs):
                v = [r[c] for r in rs if r.get(c) is not None]
                out[c] = float(np.mean(v)) if v else None
        return out

    out = agg(rows) if rows else {"n": 0}
    out["by_lang"] = {l: agg([r for r in rows if r["lang"] == l]) for l in sorted({r["lang"] for r in rows})}
    return out


# ------------------------------------------------------------------------------------ files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename: never a truncated ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def write_wav(path: Path, wav: np.ndarray, sr: int) -> None:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav, np.float32), sr, format="WAV")
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------ plugins
def load_plugin(spec: str, what: str) -> Any:
    """``module:callable`` -> ``callable()`` (a user-supplied ASR or speaker embedder)."""
    import importlib

    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ConfigError(f"{what} plugin {spec!r}: write it as module:factory (a callable returning the object)")
    try:
        return getattr(importlib.import_module(mod), fn)()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} plugin {spec!r} cannot be loaded: {e}") from None


def row_key(seed: int, name: str):
    """A PRNG key per utterance, from the seed and the utterance id (independent of order and batching)."""
    import jax

    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)


def use_llm_checkpoint(tts, workdir: str | Path) -> None:
    """Replace the LM params of ``tts`` (a :class:`~cosyvoice2_jax.pipeline.CosyVoice2`) by those of the
    latest checkpoint of a training run (the compiled programs stay: same shapes and placement)."""
    import jax

    trained = load_trained_llm(workdir)
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
    if shapes(trained) != shapes(tts.lm.params):
        raise ConfigError(f"--llm-checkpoint {workdir}: its LM does not have the shapes of the "
                          f"--model-dir LM (trained from another model size?)")
    tts.lm.set_params(trained)


def load_trained_llm(workdir: str | Path):
    """LM params of the latest checkpoint of a training run (``train.workdir``; LM or DPO policy)."""
    import orbax.checkpoint as ocp

    from .train.checkpoint import Checkpointer

    ck = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            raise ConfigError(f"{workdir} has no training checkpoint (checkpoints/<step>)")
        state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        ck.close()
    params = state["params"]
    return params.get("policy", params) if isinstance(params, dict) else params


# ------------------------------------------------------------------------------------ run
CSV_COLUMNS = ("utt", "lang", "target_text", "hypothesis", "wer", "sub", "del", "ins", "n_ref", "sim", "seconds",
               "wav")  # + MOS_COLUMNS (after "sim") when the scorer computes MOS


def evaluate(tts, rows: Sequence[EvalRow], out_dir: str | Path, scorer: Scorer, *, seed: int = 0,
             batch_size: int = 8, lang: str | None = None, save_wavs: bool = False, wav_dir: str | Path | None = None,
             progress: bool = True, meta: dict | None = None) -> dict[str, Any]:
    """Synthesise every row with ``tts`` (a :class:`~cosyvoice2_jax.pipeline.CosyVoice2`; rows in batches
    through ``synthesize_batch``, per-row keys from ``seed`` and the utterance id), score, write
    ``out_dir/results.csv`` and ``out_dir/summary.json``. ``wav_dir``: score ``<wav_dir>/<utt>.wav``
    instead of synthesising (``tts`` may be None). ``lang``: ``en``/``zh`` for all rows (default: per
    row, ``zh`` when the target has CJK characters). Returns the summary."""
    from tqdm import tqdm

    from .frontend.audio import load_wav
    from .pipeline.model import SynthesisRequest

    out_dir = Path(out_dir)
    if tts is None and wav_dir is None:
        raise ConfigError("evaluate needs a model (tts) or a folder of synthesised wavs (wav_dir)")
    results: list[dict] = []
    bar = tqdm(total=len(rows), desc="eval", unit="utt", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        if wav_dir is not None:
            outs = []
            for r in batch:
                p = Path(wav_dir) / f"{r.utt}.wav"
                if not p.is_file():
                    raise EvalListError(f"{p} missing: --wav-dir must hold <utt>.wav for every row")
                outs.append(load_wav(p, 16000))
            sr_out, outs_16k = 16000, outs
        else:
            reqs = [SynthesisRequest("zero_shot", text=r.target_text, prompt_wav=str(r.prompt_wav),
                                     prompt_text=r.prompt_text, key=row_key(seed, r.utt)) for r in batch]
            outs, sr_out = tts.synthesize_batch(reqs), tts.sample_rate
            outs_16k = [to_16k(w, sr_out) for w in outs]
        refs = [load_wav(r.prompt_wav, 16000) for r in batch]
        langs = [lang or language_of(r.target_text) for r in batch]
        scored = scorer.score(outs_16k, [r.target_text for r in batch], refs, langs)
        for r, w, s in zip(batch, outs, scored):
            wav_path = ""
            if save_wavs and wav_dir is None:
                wav_path = str(out_dir / "wavs" / f"{r.utt}.wav")
                write_wav(Path(wav_path), w, sr_out)
            results.append({"utt": r.utt, "target_text": r.target_text, "seconds": len(w) / sr_out,
                            "wav": wav_path, **s})
        bar.update(len(batch))
    bar.close()
    summary = {**summarize(results), **(meta or {})}
    cols = CSV_COLUMNS
    if getattr(scorer, "mos", False):
        i = CSV_COLUMNS.index("sim") + 1
        cols = CSV_COLUMNS[:i] + MOS_COLUMNS + CSV_COLUMNS[i:]
    write_csv(out_dir / "results.csv", results, cols)
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8"))
    return summary


def build_scorer(asr: str, speaker: str, tts=None, *, whisper_dir: str | Path | None = None,
                 asr_batch: int = 8, mos: bool = False) -> Scorer:
    """``asr``: ``whisper`` (needs ``whisper_dir``) or ``module:factory``; ``speaker``: ``campplus``
    (the model's CAM++; needs ``tts``) or ``module:factory``; ``mos``: add the DNSMOS columns."""
    if mos:
        require_dnsmos()  # before any model is loaded
    if asr == "whisper":
        if whisper_dir is None:
            raise ConfigError("the Whisper ASR needs --whisper-dir (a local Hugging Face Whisper directory, e.g. "
                              "whisper-large-v3 saved with save_pretrained)")
        from .whisper import WhisperASR

        a = WhisperASR.from_dir(whisper_dir, max_batch=asr_batch)
    else:
        a = load_plugin(asr, "ASR")
    if speaker == "campplus":
        if tts is None:
            raise ConfigError("--speaker campplus uses the model's CAM++: give --model-dir (or a speaker plugin)")
        s = tts.speaker_encoder
    else:
        s = load_plugin(speaker, "speaker")
    return Scorer(a, s, mos=mos)


# ------------------------------------------------------------------------------------ command line
def add_arguments(p) -> None:
    """The options of ``cosyvoice2-jax eval`` and ``scripts/evaluate.py``."""
    from pathlib import Path as _P

    p.add_argument("--list", type=_P, required=True, help="Seed-TTS-eval meta.lst: utt|prompt_text|prompt_wav|target_text")
    p.add_argument("--out", type=_P, required=True, help="output folder (results.csv, summary.json[, wavs/])")
    p.add_argument("--model-dir", type=_P, help="release or converted directory to synthesise with")
    p.add_argument("--llm-checkpoint", type=_P, help="use the LM of this training run's latest checkpoint "
                   "(train.workdir of an lm or dpo run) instead of the release's")
    p.add_argument("--wav-dir", type=_P, help="score <wav-dir>/<utt>.wav instead of synthesising")
    p.add_argument("--sampling", choices=("ras", "greedy"), default="ras", help="LM sampling (default ras)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-utterance PRNG keys")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per synthesis/scoring batch")
    p.add_argument("--lang", choices=("en", "zh"), help="score all rows as en (WER) or zh (CER); default per row")
    p.add_argument("--asr", default="whisper", help="'whisper' (default, needs --whisper-dir) or module:factory")
    p.add_argument("--whisper-dir", type=_P, help="local Hugging Face Whisper directory")
    p.add_argument("--speaker", default="campplus", help="'campplus' (the model's CAM++) or module:factory")
    p.add_argument("--mos", action="store_true", help="add DNSMOS P.835 columns (dnsmos_ovrl/sig/bak; needs the "
                   "'perceptual' extra: speechmos ships its ONNX models in the wheel)")
    p.add_argument("--save-wavs", action="store_true", help="also write the synthesised audio to OUT/wavs/")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> dict:
    """Run the harness from parsed :func:`add_arguments` options; returns the summary."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model_dir is None and args.wav_dir is None:
        raise ConfigError("give --model-dir (synthesise) or --wav-dir (score existing audio)")
    done = [args.out / n for n in ("results.csv", "summary.json") if (args.out / n).exists()]
    if done and not args.overwrite:
        raise ConfigError(f"{done[0]} exists; pass --overwrite to replace it or choose another --out")
    rows = read_list(args.list)
    if args.mos:
        require_dnsmos()  # before any model is loaded
    tts = None
    if args.model_dir is not None:
        from .pipeline import CosyVoice2

        tts = CosyVoice2.from_pretrained(args.model_dir, sampling=args.sampling, seed=args.seed)
        if args.llm_checkpoint is not None:
            use_llm_checkpoint(tts, args.llm_checkpoint)
    scorer = build_scorer(args.asr, args.speaker, tts, whisper_dir=args.whisper_dir, mos=args.mos)
    meta = {"list": str(args.list), "model_dir": str(args.model_dir or ""), "llm_checkpoint": str(args.llm_checkpoint or ""),
            "wav_dir": str(args.wav_dir or ""), "sampling": args.sampling, "seed": args.seed, "asr": args.asr,
            "whisper_dir": str(args.whisper_dir or ""), "speaker": args.speaker, "mos": bool(args.mos)}
    return evaluate(tts if args.wav_dir is None else None, rows, args.out, scorer, seed=args.seed,
                    batch_size=args.batch_size, lang=args.lang, save_wavs=args.save_wavs, wav_dir=args.wav_dir,
                    progress=not args.no_progress, meta=meta)


__all__ = ["add_arguments", "run_cli", "ASR", "CSV_COLUMNS", "EvalListError", "EvalRow", "MOS_COLUMNS", "Scorer",
           "SpeakerEmbedder", "atomic_write_bytes", "build_scorer", "cosine", "dnsmos", "dnsmos_available", "error_rate",
           "evaluate", "is_cjk", "language_of", "load_plugin", "load_trained_llm", "normalize_text", "read_list",
           "require_dnsmos", "row_key", "summarize", "to_16k", "use_llm_checkpoint", "write_csv"]
