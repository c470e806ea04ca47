#!/usr/bin/env python3
"""Extract S3Tokenizer v2 speech tokens for training data, batched (JAX).

Same output as the official ``tools/extract_speech_token.py`` (which runs the ONNX model one
utterance at a time): ``utt2speech_token.pt``, a ``torch.save`` dict ``utt -> list[int]`` that
``tools/make_parquet_list.py`` reads, written when torch is importable; and always the torch-free
``utt2speech_token.npz`` (one int32 array per utterance id).

Differences from the official tool: utterances are batched (grouped by length buckets), and
audio longer than 30 s is tokenized in 30 s windows with 4 s overlap (s3tokenizer 0.3.0's
scheme) instead of being skipped with an empty token list.

Input: ``--dir DATA`` with a Kaldi ``wav.scp`` (``utt path`` per line), or ``--wav-dir FOLDER``
(every audio file; utt id = file name without extension). Output goes to ``--out`` (default: the
data dir, as the official tool).

Weights: ``--model-dir`` (a CosyVoice2 release dir: ``speech_tokenizer_v2.onnx``), ``--onnx FILE``,
``--torch-ckpt FILE`` (an ``S3TokenizerV2`` state dict) or ``--random-init SEED`` (smoke tests and
benchmarks only).

    python scripts/extract_speech_tokens.py --wav-dir my_wavs --out /tmp/tok --random-init 0
    python scripts/extract_speech_tokens.py --dir data/train --model-dir pretrained_models/CosyVoice2-0.5B

Prints a JSON summary (utterances/s; with ``--bench`` of a second, already compiled pass).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



def main(argv=None):
    from cosyvoice2_jax.train import extract as X

    ap = X.build_parser(__doc__.split("\n\n")[0], "data dir with wav.scp", "mel frames are padded to a multiple of this")
    args, items = X.parse(ap, argv)

    from cosyvoice2_jax.config import TokenizerConfig
    from cosyvoice2_jax.frontend.audio import whisper_log_mel
    from cosyvoice2_jax.tokenizer import SpeechTokenizer
    from cosyvoice2_jax.train.datalist import save_mapping

    config = TokenizerConfig()
    params, config = X.load_weights(args, "tokenizer", config)
    tok = SpeechTokenizer(params, config, frame_bucket=args.frame_bucket, max_batch=args.batch_size)
    utt2token, stats = X.run(items, whisper_log_mel, tok.tokenize, args.batch_size, "speech tokens", args.bench)
    written = save_mapping(Path(args.out or args.dir), "utt2speech_token", utt2token, lambda v: [int(i) for i in v])
    print(json.dumps({**stats, "compiled_programs": tok.compiled_programs(),
                      "tokens": int(sum(len(v) for v in utt2token.values())), "written": written}))


if __name__ == "__main__":
    main()
