#!/usr/bin/env bash
# Build the *test oracle* environment: the official CosyVoice 2 PyTorch modules from PyPI, used only
# by the parity tests (tests/oracle/). It needs older pins than the project (numpy<2,
# transformers 4.51), hence its own venv. No model weights are downloaded.
#
#   bash scripts/setup_oracle_env.sh [VENV_DIR]        (default .oracle-venv)
#
# Packages and why:
#   cosyvoice-minicpmo 0.1.0  the unmodified official `cosyvoice` model code (+ `matcha`), no deps
#   s3tokenizer 0.3.0         PyTorch S3TokenizerV2 (+ whisper log-mel, onnx2torch)
#   chatterbox-tts 0.1.7      only its CAMPPlus file (3D-Speaker structure and names), no deps
#   torchaudio 2.11.0         pure-python parts only (kaldi fbank, Resample); its native libs are
#                             built for another torch and are removed so the import works
set -euo pipefail
VENV="${1:-.oracle-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
# torch is always pinned: an unpinned torch pulls a multi-GB CUDA build.
"$PIP" install -q "torch==2.13.0"
"$PIP" install -q "numpy==1.26.4" "scipy==1.17.1" "einops==0.8.2" "omegaconf==2.3.0" \
  "transformers==4.51.3" "tokenizers==0.21.4" "huggingface_hub==0.36.2" "safetensors==0.8.0" \
  "diffusers==0.29.0" "onnx==1.23.2" "onnxruntime" tqdm "librosa==0.10.2.post1" inflect regex \
  tiktoken more-itertools hyperpyyaml "pyworld-prebuilt==0.3.6.post1"
"$PIP" install -q --no-deps "cosyvoice-minicpmo==0.1.0" "s3tokenizer==0.3.0" \
  "chatterbox-tts==0.1.7" "conformer==0.3.2" "torchaudio==2.11.0" "openai-whisper==20250625"
SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SP"/torchaudio/lib/*.so
"$VENV/bin/python" tests/oracle/server.py --selftest
echo "oracle venv ready: $VENV"
