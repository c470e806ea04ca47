"""Text front end vs the official tokenizer class and frontend_utils rules."""
from __future__ import annotations

import numpy as np
import pytest

from cosyvoice2_jax.errors import TextError
from cosyvoice2_jax.frontend import text as T
from toy_tokenizer import DEFAULT_CORPUS, write_toy_qwen_tokenizer

LONG_ZH = ("在那遥远的小山村里，住着一位年迈的老人。他每天清晨都会去村口的大树下坐一坐，看着太阳慢慢升起。"
           "村里的孩子们都很喜欢他，因为他总是会讲许多有趣的故事。有一天，一个小女孩问他：“爷爷，您为什么每天都来这里？”"
           "老人笑着说：“因为我在等一个很久以前的朋友。”孩子们听了都很好奇，纷纷围过来想听这个故事。"
           "老人慢慢地讲起了他年轻时候的经历，那是一段充满了冒险与友情的岁月；他们一起翻过高山，一起渡过大河，"
           "一起在夜空下数星星！后来，朋友去了远方，再也没有回来。")
LONG_EN = ("Once upon a time, in a small village by the sea, there lived an old fisherman named Tom. "
           "Every morning he would wake up before dawn, prepare his nets, and row his little boat out to the open "
           "water. He had done this for 52 years, and he knew every wave and every current by heart! "
           "One day, a terrible storm came from the north; the sky turned black and the wind howled like a wolf. "
           "Tom was far from the shore, but he did not panic. He tied himself to the mast and waited. "
           "When the storm finally passed, he found himself on an island he had never seen before. "
           "There were strange birds, tall trees with golden fruit, and a small hut with smoke rising from it. "
           "Who could live in such a place? He walked slowly toward the hut: the door opened, and an old woman "
           "smiled at him.")

CORPUS = [
    "希望你以后能够做的比我还好呦。",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。",
    "今天是2024年5月1日，气温25度。",
    "这个房间的面积是30m²，体积是60m³。",
    "他说 - 我们走吧",
    "（注意）【重要】请不要`随便`乱动——谢谢。",
    "你好 世界 hello world 再见",
    "我们 一起 去 吃饭 吧，好吗、",
    "价格是3.5元，，",
    "请问你叫什么名字？我叫小明！很高兴认识你；再见：明天见。",
    "他说：“今天真冷。”她回答：“是啊。”",
    "我喜欢用Python写代码, 也喜欢JAX.",
    "第1名是张三，第2名是李四，第10名是王五。",
    "哈哈哈！！！",
    "八百标兵奔北坡，炮兵并排北边跑。",
    "   前后有空格的句子   ",
    "这是一个没有标点的句子",
    "在面对挑战时，他展现了非凡的<strong>勇气</strong>与智慧。",
    "[laughter]真的吗？[breath]太好了。",
    LONG_ZH,
    LONG_ZH + LONG_ZH,
    "The quick brown fox jumps over the lazy dog.",
    "I have 3 apples and 12 oranges.",
    "In 2024, about 8000000 people visited the city.",
    "Call me at 555 1234 tomorrow!",
    "Version 3.14 is better than version 2.",
    "Hello, how are you? I'm fine; thanks: and you?",
    "This sentence has no final punctuation",
    "Wait... what?!",
    "He said \"hello.\" Then he left.",
    "CosyVoice 2 supports zero-shot voice cloning across 5 languages.",
    "!!!",
    "A short one.",
    "Numbers like 007 and 100 and 1000000 should be spelled out.",
    "Mr. Smith paid $45 for 2 books.",
    LONG_EN,
    LONG_EN + " " + LONG_EN,
    "Mixed English and numbers: 1st, 2nd, 3rd place.",
    "Tabs\tand\nnewlines in English text.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "What time is it? It's 10 o'clock.",
    "OK.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_toy_qwen_tokenizer(tmp_path_factory.mktemp("CosyVoice-BlankEN"),
                                    corpus=DEFAULT_CORPUS + tuple(CORPUS))


@pytest.fixture(scope="module", params=["dir", "file"])
def tok(tok_dir, tmp_path_factory, request):
    """Built from the directory (transformers), and re-read from the ``tokenizers`` file it saves
    (what converted directories load): every test below runs on both."""
    t = T.QwenTextTokenizer.from_dir(tok_dir)
    if request.param == "file":
        path = tmp_path_factory.mktemp("text_tokenizer") / "text_tokenizer.json"
        t.save(path)
        t = T.QwenTextTokenizer.from_file(path)
    return t


def test_corpus_size():
    assert len(CORPUS) >= 40


def test_tokenizer_encode_decode_matches_official(tok, tok_dir, oracle):
    texts = CORPUS + ["<|endofprompt|>你好[breath]hello", "<strong>强调</strong>[laughter]", "<|im_start|>x<|im_end|>"]
    ref = oracle("frontend:qwen_encode", token_dir=str(tok_dir), texts=texts)
    ids, lens = ref["ids"], ref["lens"]
    off = 0
    for i, t in enumerate(texts):
        want = ids[off: off + lens[i]].tolist()
        off += lens[i]
        got = tok.encode(t)
        assert got == want, t
        assert tok.decode(got) == str(ref["decoded"][i]), t
        assert tok.decode(got, skip_special_tokens=False) == str(ref["decoded_special"][i]), t


def test_saved_tokenizer_is_the_same(tok_dir, tmp_path):
    """``save`` + ``from_file`` (no transformers) gives the ids, text and vocabulary of ``from_dir``."""
    a = T.QwenTextTokenizer.from_dir(tok_dir)
    a.save(tmp_path / "t.json")
    b = T.QwenTextTokenizer.from_file(tmp_path / "t.json")
    texts = CORPUS + ["<|endofprompt|>你好[breath]hello", "a<|im_start|>b<|endoftext|>c [mn][lipsmack]",
                      "emoji 😀👍🏽 e\u0301 \ue000 ሰላም \u200b", "  lead\t\ttabs\r\n\nnew  ", "<strong", "[breath"]
    for t in texts:
        ids = a.encode(t)
        assert b.encode(t) == ids, t
        for skip in (True, False):
            assert b.decode(ids, skip_special_tokens=skip) == a.decode(ids, skip_special_tokens=skip), t
        assert b.byte_fallback_chars(t) == a.byte_fallback_chars(t), t
    assert len(b) == len(a) == a.vocab_size
    for s in T.COSYVOICE_SPECIAL_TOKENS + (T.EOS_TOKEN,):
        assert b.token_id(s) == a.token_id(s)
    with pytest.raises(TextError, match="could not load the tokenizer file"):
        T.QwenTextTokenizer.from_file(tmp_path / "missing.json")


def test_special_token_ids_come_from_files(tok, tok_dir):
    import json

    vocab = json.loads((tok_dir / "vocab.json").read_text())
    # <|endoftext|>, <|im_start|>, <|im_end|> follow the base vocab; CosyVoice's specials come next
    assert tok.token_id("<|endoftext|>") == len(vocab)
    assert tok.token_id("<|im_end|>") == len(vocab) + 2
    assert tok.endofprompt_id == len(vocab) + 3  # not 151646: derived from this vocabulary
    assert tok.encode("<|endofprompt|>") == [tok.endofprompt_id]
    assert tok.token_id("[breath]") == len(vocab) + 4
    with pytest.raises(TextError, match="not in this tokenizer"):
        tok.token_id("[no-such-token]")


def test_normalize_matches_official_rules(tok, tok_dir, oracle):
    ref = oracle("frontend:text_normalize", token_dir=str(tok_dir), texts=CORPUS)
    pieces, counts = ref["pieces"].tolist(), ref["counts"].tolist()
    off = 0
    n_multi = 0
    for t, c in zip(CORPUS, counts):
        want = pieces[off: off + c]
        off += c
        if c == 0:  # official returns nothing to speak: we raise a clear error instead
            with pytest.raises(TextError, match="nothing to speak"):
                T.normalize(t, tok.encode, use_wetext=False)
            continue
        got = T.normalize(t, tok.encode, use_wetext=False)
        assert got == want, t
        n_multi += c > 1
    assert n_multi >= 3  # the long paragraphs really were split


def test_rule_functions_hand_derived():
    assert T.replace_blank("你好 世界 hello world") == "你好世界hello world"
    assert T.replace_corner_mark("30m²") == "30m平方"
    assert T.remove_bracket("（a）【b】`c`——d") == "abc d"
    assert T.spell_out_number("I have 3 apples and 12 pears") == "I have three apples and twelve pears"
    assert T.is_only_punctuation("!!!。，") and not T.is_only_punctuation("a!")
    assert T.split_paragraph("你好。再见", len, "zh") == ["你好。再见。"]  # short tail merges
    parts = T.split_paragraph("一二三四五。" * 30, len, "zh")
    assert all(len(p) <= 80 for p in parts[:-1]) and "".join(parts) == "一二三四五。" * 30


def test_text_frontend_passthrough(tok):
    fe = T.TextFrontend(tok, use_wetext=False)

    def gen():
        yield "你好"

    g = gen()
    assert fe.normalize(g) == [g]
    assert fe.normalize("raw 123 text", text_frontend=False) == ["raw 123 text"]
    assert list(fe.encode_stream(["你好", "hello"])) == tok.encode("你好") + tok.encode("hello")


def test_bad_text_inputs(tok, tmp_path):
    cases = [
        (lambda: T.normalize("", tok.encode), "empty"),
        (lambda: T.normalize("   \n ", tok.encode), "empty"),
        (lambda: T.normalize(None, tok.encode), "must be a str"),
        (lambda: T.normalize("？！。", tok.encode, use_wetext=False), "nothing to speak"),
        (lambda: T.split_paragraph("", len), "empty"),
        (lambda: tok.encode(b"bytes"), "must be a str"),
        (lambda: T.QwenTextTokenizer.from_dir(tmp_path / "missing"), "does not exist"),
        (lambda: T.QwenTextTokenizer.from_dir(tmp_path), "not a Qwen2 tokenizer directory"),
        (lambda: T.TextFrontend(tok).normalize("  ", text_frontend=False), "empty"),
    ]
    if not T.wetext_available():
        cases.append((lambda: T.normalize("你好", tok.encode, use_wetext=True), "wetext"))
    for fn, msg in cases:
        with pytest.raises(TextError, match=msg):
            fn()


def test_byte_fallback_chars_and_blank_text(tok):
    """Characters the BPE only spells as raw bytes are named; zero-width-only text is empty."""
    assert tok.byte_fallback_chars("你好, hello") == []  # in the toy tokenizer's corpus
    got = tok.byte_fallback_chars("hello \ue000 ሰላም \u200b ሰ")
    assert got == ["\ue000", "ሰ", "ላ", "ም", "\u200b"]  # private use, Ethiopic, zero-width space; once each
    assert T.is_blank("\u200b\u200c\u200d\u2060\ufeff \n") and not T.is_blank("\u200ba")
    fe = T.TextFrontend(tok, use_wetext=False)
    for text_frontend in (True, False):
        with pytest.raises(TextError, match="zero-width"):
            fe.normalize("\u200b\u200b", text_frontend=text_frontend)


def test_markers_skip_the_rules_as_head(tok):
    """Official git HEAD ``text_normalize``: text with a ``<|...|>`` marker skips normalisation."""
    fe = T.TextFrontend(tok, use_wetext=False)
    text = "You are 2 times<|endofprompt|>faster."
    assert fe.normalize(text) == [text]
    assert fe.normalize(text, split=False) == text
    assert fe.normalize("You are 2 times faster.") == ["You are two times faster."]
