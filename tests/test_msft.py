"""Multi-speaker fine-tuning (paper section 2.8): the "Speaker A<|endofprompt|>" prefix in the
training rows (label column optional -> "unknown") and at inference (speaker_tag), equal to what the
official instruct path tokenizes for the same instruction text."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosyvoice2_jax.errors import TextError
from cosyvoice2_jax.frontend.text import QwenTextTokenizer, speaker_prompt
from cosyvoice2_jax.train import data as D
from test_train_data import make_shards
from toy_tokenizer import write_toy_qwen_tokenizer


def test_speaker_prompt_text():
    assert speaker_prompt("A") == "Speaker A<|endofprompt|>"
    assert speaker_prompt(" Alice ") == "Speaker Alice<|endofprompt|>"
    assert speaker_prompt(None) == speaker_prompt("") == speaker_prompt("  ") == "unknown<|endofprompt|>"
    with pytest.raises(TextError, match="endofprompt"):
        speaker_prompt("A<|endofprompt|>")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_toy_qwen_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prefix_tokens_equal_official_instruct_tokens(tok_dir, oracle):
    """The official instruct path (``frontend_instruct2`` at git HEAD) tokenizes the instruction
    with the official Qwen tokenizer into ``prompt_text``, which the LM reads right before the
    text tokens. The mSFT prefix of the data pipeline and of ``speaker_tag`` (tests/test_pipeline.py)
    is ``encode(speaker_prompt(label))``: the same ids for the same instruction text."""
    labels = ["A", None, "说话人甲"]
    texts = ["Speaker A<|endofprompt|>", "unknown<|endofprompt|>", "Speaker 说话人甲<|endofprompt|>"]
    ref = oracle("frontend:qwen_encode", token_dir=str(tok_dir), texts=texts)
    tok = QwenTextTokenizer.from_dir(tok_dir)
    off = 0
    for label, n in zip(labels, ref["lens"]):
        assert tok.encode(speaker_prompt(label)) == ref["ids"][off: off + n].tolist(), label
        off += n


def test_training_rows_get_the_prefix(tmp_path, tok_dir):
    tok = QwenTextTokenizer.from_dir(tok_dir).encode
    lst, rows = make_shards(tmp_path, n_rows=3, n_shards=1, seed=1)
    # a second shard without the label column: its rows are "unknown"
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "spk"} for r in rows[:1]])
    pq.write_table(table, tmp_path / "nospk.tar")
    lst.write_text(lst.read_text() + "nospk.tar\n")
    cfg = D.DataConfig(data_list=str(lst), need_mel=False, speaker_prompt=True, text_buckets=(64,))
    src = D.ParquetSource(D.read_data_list(lst))
    batch = D.Collate(src, cfg, tok)([0, 1, 2, 3])
    for b, (row, label) in enumerate(zip(rows[:3] + rows[:1], ["spk0", "spk1", "spk2", None])):
        prefix = tok(speaker_prompt(label))
        want = prefix + tok(row["text"])
        n = int(batch["text_token_len"][b])
        assert batch["text_token"][b, :n].tolist() == want
        assert int(batch["text_prompt_len"][b]) == len(prefix)
    assert tok("unknown<|endofprompt|>") == batch["text_token"][3, : batch["text_prompt_len"][3]].tolist()
    plain = D.Collate(src, D.DataConfig(data_list=str(lst), need_mel=False, text_buckets=(64,)), tok)([0])
    assert "text_prompt_len" not in plain and plain["text_token"][0, : plain["text_token_len"][0]].tolist() == \
        tok(rows[0]["text"])
