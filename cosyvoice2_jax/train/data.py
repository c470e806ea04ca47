"""grain input pipeline over the official parquet shards.

Data format (as the official ``tools/make_parquet_list.py`` writes it): parquet files listed one
per line in a ``data.list`` file, with columns ``utt``, ``audio_data`` (encoded audio bytes),
``text``, ``spk``, ``utt_embedding``, ``spk_embedding`` (192 floats), ``speech_token`` (int list,
25 Hz) and optionally ``instruct`` and ``reject_speech_token`` (DPO). ``wav`` (a path) may be
present and is ignored.

Multi-speaker fine-tuning (``speaker_prompt: true``, ``configs/train/msft.yaml``; paper section
2.8): the text tokens of every row start with the tokens of ``"Speaker <label><|endofprompt|>"``
(:func:`cosyvoice2_jax.frontend.text.speaker_prompt`), the label read from the column
``speaker_column`` (``spk`` by default); rows without the column or with an empty label get
``"unknown<|endofprompt|>"``. The batch then also holds ``text_prompt_len`` (B,), the prefix length.

Pipeline, and why it is shaped this way:

1. :class:`ParquetSource` gives random access to rows across shards (row-group reads, cached).
2. :func:`plan_epoch` makes the epoch's batches *from the index alone* (token counts are read once
   at start-up; no audio is decoded): filters by the official length limits, shuffles with the
   (seed, epoch) key, sorts inside windows and cuts **length-bucketed dynamic batches** (at most
   ``max_frames_in_batch`` padded mel frames). Each batch has one of a few fixed shapes
   (``token_buckets`` x ``text_buckets``, batch rows fixed per bucket, padded with empty rows),
   so train steps compile once per bucket and never per batch.
3. ``grain.MapDataset.source(plan).map(load_and_collate)``: decoding, resampling to 24 kHz,
   features and tokenisation run in grain threads or worker processes.
4. The iterator state (``epoch`` + grain's own state) is saved with each checkpoint: a killed run
   resumes with exactly the next batch.
5. Multi-process runs (``process_block``): every process plans the same global epoch and loads
   only its contiguous slice of each batch's rows (the rows its devices hold, see
   :func:`cosyvoice2_jax.train.distributed.process_batch_block`); the trainer assembles the global
   batch. No row is loaded by two processes, and all processes stay at the same plan position, so
   bucketing and exact resume work per process.

HiFT GAN mode (``truncate_length > 0``, the official ``data_pipeline_gan``): every utterance is cut
to a random ``truncate_length``-sample crop (or zero-padded), padded to a multiple of
``align_samples`` (official HEAD: 960, one 25 Hz token), and a batch holds only ``speech``
``(B, W)``, ``speech_feat`` ``(B, W / 480, 80)``, ``pitch_feat`` ``(B, W / 480)`` and ``valid``: one
fixed shape, ``max_frames_in_batch // (W / 480)`` rows. The crop start is drawn from
``(seed, epoch, row)``, so resumed runs see the same crops.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CosyVoiceError
from ..frontend import audio as A

REQUIRED_COLUMNS = ("utt", "audio_data", "text", "utt_embedding", "spk_embedding", "speech_token")


class DataError(CosyVoiceError, ValueError):
    """Training data is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_list: str = ""
    sample_rate: int = 24000
    token_mel_ratio: int = 2
    # official filter limits (processor.filter): 100 Hz frames and text tokens
    max_length: int = 40960
    min_length: int = 100
    token_max_length: int = 200
    token_min_length: int = 1
    # batching
    max_frames_in_batch: int = 2000  # padded mel frames (50 Hz) per batch
    token_buckets: tuple[int, ...] = (50, 100, 150, 200, 300, 400, 600, 800, 1000, 1500)
    text_buckets: tuple[int, ...] = (16, 32, 64, 128, 256)
    batch_multiple: int = 1  # batch rows are rounded to a multiple of this (data x fsdp size)
    sort_window: int = 500
    shuffle: bool = True
    seed: int = 0
    normalize_embedding: bool = True
    use_spk_embedding: bool = False  # official: utt embedding for SFT, spk embedding option
    num_threads: int = 2
    num_workers: int = 0  # > 0: grain worker processes (mp_prefetch)
    need_mel: bool = True
    need_wav: bool = False
    wav_buckets_seconds: bool = False
    # extra per-row features: "pitch" = F0 at the mel frame rate (HiFT GAN target, pyworld)
    features: tuple[str, ...] = ()
    # HiFT GAN mode (> 0): fixed-length random crops (official truncate_length 24480) ...
    truncate_length: int = 0
    # ... zero-padded to a multiple of this many samples (official HEAD compute_fbank num_frames: 960)
    align_samples: int = 0
    hop_size: int = 480  # samples per mel frame at 24 kHz
    # multi-speaker fine-tuning: prefix the text with "Speaker <label><|endofprompt|>" (module docstring)
    speaker_prompt: bool = False
    speaker_column: str = "spk"


FEATURES = ("pitch",)


def gan_segment_samples(cfg: DataConfig) -> int:
    """Samples per GAN crop: ``truncate_length`` rounded up to ``align_samples``."""
    n = cfg.truncate_length
    if cfg.align_samples > 0:
        n = -(-n // cfg.align_samples) * cfg.align_samples
    return n


def _check_features(cfg: DataConfig) -> None:
    bad = [f for f in cfg.features if f not in FEATURES]
    if bad:
        raise DataError(f"unknown data feature(s) {', '.join(map(repr, bad))}; available: {', '.join(FEATURES)}")
    if cfg.truncate_length > 0 and gan_segment_samples(cfg) % cfg.hop_size:
        raise DataError(f"GAN crop of {gan_segment_samples(cfg)} samples is not a multiple of the mel hop "
                        f"{cfg.hop_size}; choose truncate_length/align_samples accordingly (official: 24480/960)")
    if "pitch" in cfg.features:
        _pyworld()  # fail at start-up, not in a loader thread
    if "pitch" in cfg.features and not (cfg.need_mel or cfg.truncate_length > 0):
        raise DataError("the 'pitch' feature is computed at the mel frame rate: set need_mel=True")


def read_data_list(path: str | Path) -> list[Path]:
    """Parquet shard paths from a ``data.list`` file (relative paths: relative to the list)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data list {path} does not exist; make one with scripts/make_parquet.py "
                        "(one parquet file path per line)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        if not p.is_absolute():
            p = path.parent / p
        if not p.is_file():
            raise DataError(f"{path}: shard {p} does not exist")
        out.append(p)
    if not out:
        raise DataError(f"data list {path} names no parquet files")
    return out


class ParquetSource:
    """Random access to the rows of several parquet shards (a grain RandomAccessDataSource)."""

    def __init__(self, shards: Sequence[str | Path]):
        import pyarrow.parquet as pq

        self.shards = [str(s) for s in shards]
        self._index = []  # global row -> (shard, row_group, row in group)
        self.token_len = []
        self.text_len_chars = []
        for si, s in enumerate(self.shards):
            f = pq.ParquetFile(s)
            missing = [c for c in REQUIRED_COLUMNS if c not in f.schema_arrow.names]
            if missing:
                raise DataError(f"{s} lacks column(s) {', '.join(missing)}; expected the official layout "
                                f"({', '.join(REQUIRED_COLUMNS)})")
            for g in range(f.num_row_groups):
                t = f.read_row_group(g, columns=["speech_token", "text"])
                toks = t.column("speech_token").to_pylist()
                texts = t.column("text").to_pylist()
                for r in range(t.num_rows):
                    self._index.append((si, g, r))
                    self.token_len.append(len(toks[r] or ()))
                    self.text_len_chars.append(len(texts[r] or ""))
        self.token_len = np.asarray(self.token_len, np.int64)
        self._cache_key = None
        self._cache = None

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        import pyarrow.parquet as pq

        si, g, r = self._index[int(i)]
        if self._cache_key != (si, g):
            self._cache = pq.ParquetFile(self.shards[si]).read_row_group(g).to_pylist()
            self._cache_key = (si, g)
        return dict(self._cache[r])

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.shards)} shards, {len(self)} rows)"


# ----------------------------------------------------------------------------------- planning
def _bucket(n: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if n <= b:
            return b
    return None


def plan_epoch(token_len: np.ndarray, cfg: DataConfig, epoch: int,
               text_len: np.ndarray | None = None) -> list[list[int]]:
    """Batches (lists of row indices, ``-1`` = padding row) for one epoch; deterministic in
    ``(cfg.seed, epoch)``. Rows longer than the largest token bucket or outside the length limits
    are dropped."""
    frames100 = token_len * 4  # 25 Hz tokens -> 100 Hz frames (the official filter unit)
    keep = (frames100 >= cfg.min_length) & (frames100 <= cfg.max_length) & (token_len > 0)
    keep &= token_len <= max(cfg.token_buckets)
    if text_len is not None:
        keep &= (text_len >= cfg.token_min_length) & (text_len <= max(cfg.text_buckets))
    if cfg.truncate_length > 0:  # GAN crops: any length fits the single fixed shape
        keep = (frames100 >= cfg.min_length) & (frames100 <= cfg.max_length) & (token_len > 0)
    idx = np.nonzero(keep)[0]
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.shuffle:
        idx = rng.permutation(idx)
    batches: list[list[int]] = []
    for w in range(0, len(idx), cfg.sort_window):
        window = sorted(idx[w: w + cfg.sort_window].tolist(), key=lambda i: token_len[i])
        cur: list[int] = []
        cur_bucket = None
        for i in window:
            b = 0 if cfg.truncate_length > 0 else _bucket(int(token_len[i]), cfg.token_buckets)
            if cur and (b != cur_bucket or len(cur) >= rows_for_bucket(cur_bucket, cfg)):
                batches.append(_pad_rows(cur, rows_for_bucket(cur_bucket, cfg)))
                cur = []
            cur.append(int(i))
            cur_bucket = b
        if cur:
            batches.append(_pad_rows(cur, rows_for_bucket(cur_bucket, cfg)))
    if cfg.shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def rows_for_bucket(token_bucket: int, cfg: DataConfig) -> int:
    """Fixed batch rows for a token bucket: as many as fit ``max_frames_in_batch`` mel frames,
    rounded down to ``batch_multiple`` (at least one multiple). GAN mode: as many crops as fit."""
    if cfg.truncate_length > 0:
        rows = max(1, cfg.max_frames_in_batch // (gan_segment_samples(cfg) // cfg.hop_size))
    else:
        rows = max(1, cfg.max_frames_in_batch // (token_bucket * cfg.token_mel_ratio))
    m = max(1, cfg.batch_multiple)
    return max(m, rows // m * m)


def _pad_rows(rows: list[int], n: int) -> list[int]:
    return rows + [-1] * (n - len(rows))


# ----------------------------------------------------------------------------------- loading
def decode_audio(data: bytes, target_sr: int) -> np.ndarray:
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"cannot decode audio_data ({e})") from None
    wav = wav.mean(axis=1)
    if sr != target_sr:
        wav = A.resample(wav, sr, target_sr)
    peak = np.abs(wav).max() if wav.size else 0.0
    if peak > 1:  # official: normalise clipping audio
        wav = wav / peak
    return wav.astype(np.float32)


def _pyworld():
    try:
        import pyworld
    except ImportError:
        raise DataError("the 'pitch' data feature needs pyworld (the WORLD vocoder): "
                        "pip install 'cosyvoice2-jax[train]' (installs the pyworld-prebuilt wheel)") from None
    return pyworld


def pitch_feature(wav: np.ndarray, n_frames: int, sample_rate: int = 24000, hop_size: int = 480) -> np.ndarray:
    """F0 in Hz at the mel frame rate, ``(n_frames,)`` float32: the official
    ``processor.compute_f0``: WORLD harvest (dio when harvest finds < 5 voiced frames) with a frame
    period of one mel hop, refined by stonemask, then resized to ``n_frames`` with torch's
    ``interpolate(mode='linear', align_corners=False)`` rule (computed in float64)."""
    pw = _pyworld()
    x = np.ascontiguousarray(wav, dtype=np.float64)
    period = hop_size * 1000 / sample_rate
    f0, t = pw.harvest(x, sample_rate, frame_period=period)
    if np.sum(f0 != 0) < 5:  # harvest failed: fall back to dio, as the official code does
        f0, t = pw.dio(x, sample_rate, frame_period=period)
    f0 = pw.stonemask(x, f0, t, sample_rate)
    return linear_resize(f0, n_frames).astype(np.float32)


def linear_resize(x: np.ndarray, n_out: int) -> np.ndarray:
    """torch ``F.interpolate(x[None, None], size=n_out, mode='linear')`` (align_corners False) of a
    1-D float64 array: ``src = max((i + 0.5) * n_in / n_out - 0.5, 0)``, linear between
    ``floor(src)`` and the next sample (clamped at the end)."""
    n_in = x.shape[0]
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return (1.0 - lam) * x[i0] + lam * x[i1]


def gan_crop(wav: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Official ``processor.truncate`` (random crop of ``truncate_length`` samples, or zero-pad),
    then zero-pad to ``gan_segment_samples(cfg)``."""
    L = cfg.truncate_length
    if wav.shape[0] > L:
        start = int(rng.integers(0, wav.shape[0] - L + 1))
        wav = wav[start: start + L]
    out = np.zeros((gan_segment_samples(cfg),), np.float32)
    out[: wav.shape[0]] = wav
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


class Collate:
    """Row indices -> a fixed-shape padded batch (numpy), decoding audio and text per row."""

    def __init__(self, source: ParquetSource, cfg: DataConfig, tokenize: Callable[[str], Sequence[int]]):
        _check_features(cfg)
        self.source = source
        self.cfg = cfg
        self.tokenize = tokenize

    def load_gan_row(self, row: dict, i: int, epoch: int) -> dict | None:
        """One GAN example: crop, mel (``speech_feat``), optional pitch; None if undecodable."""
        cfg = self.cfg
        try:
            wav = decode_audio(row["audio_data"], cfg.sample_rate)
            wav = gan_crop(wav, cfg, np.random.default_rng([cfg.seed, epoch, int(i)]))
            out = {"speech": wav, "speech_feat": A.mel_24k(wav)}
            if "pitch" in cfg.features:
                out["pitch_feat"] = pitch_feature(wav, out["speech_feat"].shape[0], cfg.sample_rate, cfg.hop_size)
        except Exception:
            return None  # undecodable audio: the row becomes padding (valid False)
        return out

    def gan_batch(self, rows: Sequence[int], epoch: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        W = gan_segment_samples(cfg)
        Fr = W // cfg.hop_size
        B = len(rows)
        batch = {"speech": np.zeros((B, W), np.float32), "speech_feat": np.zeros((B, Fr, 80), np.float32),
                 "valid": np.zeros((B,), bool)}
        if "pitch" in cfg.features:
            batch["pitch_feat"] = np.zeros((B, Fr), np.float32)
        for b, i in enumerate(rows):
            if i < 0:
                continue
            row = self.source[i]
            if not cfg.token_min_length <= len(self.tokenize(row["text"])) <= cfg.token_max_length:
                continue  # the official filter runs before the GAN crop
            x = self.load_gan_row(row, i, epoch)
            if x is None:
                continue
            for k, v in x.items():
                batch[k][b] = v
            batch["valid"][b] = True
        return batch

    def load_row(self, i: int) -> dict | None:
        cfg = self.cfg
        row = self.source[i]
        text_token = np.asarray(self.tokenize(row["text"]), np.int32)
        prompt = None
        if cfg.speaker_prompt:
            from ..frontend.text import speaker_prompt

            prompt = np.asarray(self.tokenize(speaker_prompt(row.get(cfg.speaker_column))), np.int32)
            text_token = np.concatenate([prompt, text_token])
        if not cfg.token_min_length <= len(text_token) <= min(cfg.token_max_length, max(cfg.text_buckets)):
            return None  # official text-length filter; keeps the text bucket shapes bounded
        tok = np.asarray(row["speech_token"], np.int32)
        out = {"text_token": text_token, "speech_token": tok}
        if prompt is not None:
            out["text_prompt_len"] = len(prompt)
        emb = np.asarray(row["spk_embedding" if cfg.use_spk_embedding else "utt_embedding"], np.float32)
        out["embedding"] = _unit(emb) if cfg.normalize_embedding else emb
        if cfg.need_mel or cfg.need_wav:
            try:
                wav = decode_audio(row["audio_data"], cfg.sample_rate)
                if cfg.need_mel:
                    mel = A.mel_24k(wav)
                    # official compute_fbank with token_mel_ratio: align tokens and frames 1:2
                    n = int(min(mel.shape[0] // cfg.token_mel_ratio, tok.shape[0]))
                    out["speech_feat"] = mel[: n * cfg.token_mel_ratio]
                    out["speech_token"] = tok[:n]
                    if "pitch" in cfg.features:
                        f0 = pitch_feature(wav, mel.shape[0], cfg.sample_rate, cfg.hop_size)
                        out["pitch_feat"] = f0[: n * cfg.token_mel_ratio]
                if cfg.need_wav:
                    out["speech"] = wav
            except Exception:
                return None  # undecodable/silent audio: the row becomes padding (mask 0)
        if "reject_speech_token" in row and row["reject_speech_token"] is not None:
            out["reject_speech_token"] = np.asarray(row["reject_speech_token"], np.int32)
        return out

    def __call__(self, rows: Sequence[int], epoch: int = 0) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if cfg.truncate_length > 0:
            return self.gan_batch(rows, epoch)
        loaded = [self.load_row(i) if i >= 0 else None for i in rows]
        real = [x for x in loaded if x is not None]
        tmax = max([len(x["speech_token"]) for x in real] + [1])
        T = _bucket(tmax, cfg.token_buckets) or tmax
        lmax = max([len(x["text_token"]) for x in real] + [1])
        L = _bucket(lmax, cfg.text_buckets) or lmax
        B = len(rows)
        batch = {
            "text_token": np.zeros((B, L), np.int32), "text_token_len": np.zeros((B,), np.int32),
            "speech_token": np.zeros((B, T), np.int32), "speech_token_len": np.zeros((B,), np.int32),
            "embedding": np.zeros((B, 192), np.float32), "valid": np.zeros((B,), bool),
        }
        if cfg.need_mel:
            batch["speech_feat"] = np.zeros((B, T * cfg.token_mel_ratio, 80), np.float32)
            batch["speech_feat_len"] = np.zeros((B,), np.int32)
            if "pitch" in cfg.features:
                batch["pitch_feat"] = np.zeros((B, T * cfg.token_mel_ratio), np.float32)
        if cfg.speaker_prompt:
            batch["text_prompt_len"] = np.zeros((B,), np.int32)
        if any("reject_speech_token" in x for x in real):
            batch["reject_speech_token"] = np.zeros((B, T), np.int32)
            batch["reject_speech_token_len"] = np.zeros((B,), np.int32)
        for b, x in enumerate(loaded):
            if x is None:
                continue
            lt, ls = len(x["text_token"]), len(x["speech_token"])
            batch["text_token"][b, :lt] = x["text_token"][:L]
            batch["text_token_len"][b] = min(lt, L)
            batch["speech_token"][b, :ls] = x["speech_token"][:T]
            batch["speech_token_len"][b] = min(ls, T)
            batch["embedding"][b, : x["embedding"].shape[0]] = x["embedding"]
            batch["valid"][b] = True
            if "text_prompt_len" in x:
                batch["text_prompt_len"][b] = min(x["text_prompt_len"], L)
            if cfg.need_mel:
                f = x["speech_feat"]
                batch["speech_feat"][b, : f.shape[0]] = f
                batch["speech_feat_len"][b] = f.shape[0]
                if "pitch_feat" in x:
                    batch["pitch_feat"][b, : f.shape[0]] = x["pitch_feat"]
            if "reject_speech_token" in x and "reject_speech_token" in batch:
                r = x["reject_speech_token"][:T]
                batch["reject_speech_token"][b, : len(r)] = r
                batch["reject_speech_token_len"][b] = len(r)
        return batch


# ----------------------------------------------------------------------------------- the loader
class TrainData:
    """Epoch-wise resumable batch iterator.

    ``state()`` -> ``{"epoch": e, "grain": <grain iterator state>}``; ``TrainData(...,
    state=s)`` continues with exactly the batch after the one that was last returned.

    ``process_block=(start, stop, n)``: load only rows ``[start*B/n, stop*B/n)`` of every planned
    batch of ``B`` rows (this process's share in a multi-process run); default: whole batches.
    """

    def __init__(self, cfg: DataConfig, tokenize: Callable[[str], Sequence[int]],
                 source: ParquetSource | None = None, state: dict | None = None,
                 process_block: tuple[int, int, int] | None = None):
        self.cfg = cfg
        self.process_block = tuple(process_block) if process_block is not None else None
        self.source = source or ParquetSource(read_data_list(cfg.data_list))
        self.collate = Collate(self.source, cfg, tokenize)
        self.epoch = int((state or {}).get("epoch", 0))
        self._grain_state = (state or {}).get("grain")
        self._it = None

    def _make_iter(self):
        import grain

        plan = plan_epoch(self.source.token_len, self.cfg, self.epoch)
        if not plan:
            raise DataError("no training example passes the length filters; check the data and "
                            "DataConfig.token_buckets / max_length")
        plan = self.process_rows(plan)
        ds = grain.MapDataset.source(plan).map(functools.partial(self.collate, epoch=self.epoch))
        if self.cfg.num_workers > 0:
            it = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.num_workers))
        else:
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.cfg.num_threads, prefetch_buffer_size=2))
        it = iter(it)
        if self._grain_state is not None:
            it.set_state(self._grain_state)
            self._grain_state = None
        return it

    def process_rows(self, plan: list[list[int]]) -> list[list[int]]:
        """This process's rows of every batch of ``plan`` (all rows without a ``process_block``)."""
        if self.process_block is None or self.process_block[1] - self.process_block[0] == self.process_block[2]:
            return plan
        start, stop, n = self.process_block
        out = []
        for b in plan:
            if len(b) % n:
                raise DataError(f"a batch of {len(b)} rows cannot be split over {n} data x fsdp shards; set "
                                f"data.batch_multiple to a multiple of {n}")
            per = len(b) // n
            out.append(b[start * per: stop * per])
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._it is None:
                self._it = self._make_iter()
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "grain": self._it.get_state() if self._it is not None else None}

    def batches_per_epoch(self) -> int:
        return len(plan_epoch(self.source.token_len, self.cfg, self.epoch))


def shape_buckets(cfg: DataConfig) -> list[tuple[int, int]]:
    """All (rows, token length) shapes a batch can have (text length adds text_buckets)."""
    return [(rows_for_bucket(b, cfg), b) for b in cfg.token_buckets]
