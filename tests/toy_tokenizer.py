"""A small self-made Qwen2-style tokenizer directory, for tests and random-weight demos.

No tokenizer can be downloaded here, so tests build one: a byte-level BPE trained on a small
zh/en corpus, written in the release's ``CosyVoice-BlankEN`` layout (``vocab.json``,
``merges.txt``, ``tokenizer_config.json`` with ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>`` as added tokens right after the base vocabulary, as in Qwen2.5).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

DEFAULT_CORPUS = (
    "希望你以后能够做的比我还好呦。今天天气真不错，我们一起去公园散步吧！",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "The quick brown fox jumps over the lazy dog. Numbers like 2024 and 3.14 appear often.",
    "CosyVoice is a scalable multilingual zero-shot text-to-speech synthesizer.",
    "在面对挑战时，他展现了非凡的<strong>勇气</strong>与智慧。[laughter] 好的，我们开始吧。",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "八百标兵奔北坡，炮兵并排北边跑。One, two, three: let's go!",
)


def write_toy_qwen_tokenizer(path: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS,
                             vocab_size: int = 600) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus), trainer)
    bpe.model.save(str(path))  # vocab.json + merges.txt
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    n = len(vocab)
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
             for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))}
    cfg = {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "chat_template": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
