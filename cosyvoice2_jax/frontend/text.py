"""Text front end: the Qwen2 BPE tokenizer and the official normalisation/splitting rules.

* :class:`QwenTextTokenizer` loads the release's ``CosyVoice-BlankEN`` tokenizer directory
  (``vocab.json`` + ``merges.txt`` [+ ``tokenizer_config.json``] or ``tokenizer.json``) with
  transformers and adds the CosyVoice special tokens (``<|endofprompt|>``, ``[breath]``,
  ``[laughter]``, ``<strong>`` ...). Their ids are read from the loaded tokenizer, never
  hard-coded. :meth:`QwenTextTokenizer.save` / :meth:`~QwenTextTokenizer.from_file` keep the
  built tokenizer as one ``tokenizers`` file (loads without transformers).
* :func:`normalize` implements the official ``CosyVoiceFrontEnd.text_normalize`` (CosyVoice 2,
  ``text_frontend=True``): Chinese rules (blanks, corner marks, brackets, punctuation) or English
  number spell-out (inflect), then :func:`split_paragraph` (max 80 / min 60 / merge 20 by
  characters for Chinese, by BPE tokens otherwise), dropping punctuation-only pieces. The
  ``wetext`` WFST normaliser runs first when it is installed (``pip install wetext``), as in the
  official code; without it only the rules run.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import regex

from ..errors import TextError

# The special tokens the official get_qwen_tokenizer adds (CosyVoice 2). Order matters: new ids
# are assigned in this order after the base vocabulary.
COSYVOICE_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)
EOS_TOKEN = "<|endoftext|>"


class QwenTextTokenizer:
    """Qwen2 byte-level BPE + CosyVoice special tokens; ``encode``/``decode`` as the official.

    Wraps the ``tokenizers`` library's :class:`tokenizers.Tokenizer` (the fast tokenizer inside
    transformers' ``Qwen2Tokenizer``; transformers adds nothing to it for this BPE). Build it with
    :meth:`from_dir` from the release's ``CosyVoice-BlankEN`` directory (through transformers,
    ~1.5 s CPU, as the official), or with :meth:`from_file` from a file :meth:`save` wrote (the
    ``tokenizers`` library alone, ~20 ms; converted directories hold one, ``text_tokenizer.json``).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.skip_special_tokens = skip_special_tokens

    @classmethod
    def from_dir(cls, path: str | Path, skip_special_tokens: bool = True) -> "QwenTextTokenizer":
        path = Path(path)
        if not path.is_dir():
            raise TextError(f"tokenizer directory {path} does not exist; pass the release's "
                            "CosyVoice-BlankEN folder (vocab.json + merges.txt)")
        has_json = (path / "tokenizer.json").is_file()
        has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        if not (has_json or has_bpe):
            present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise TextError(f"{path} is not a Qwen2 tokenizer directory: it needs vocab.json + merges.txt "
                            f"(or tokenizer.json); found {present}")
        import logging

        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise TextError(f"could not load the tokenizer in {path}: {e}") from None
        tok.add_special_tokens({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                                "additional_special_tokens": list(COSYVOICE_SPECIAL_TOKENS)})
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise TextError(f"{path}: transformers built a slow tokenizer ({type(tok).__name__}); install the "
                            "tokenizers package (pip install tokenizers)")
        return cls(backend, skip_special_tokens)

    @classmethod
    def from_file(cls, path: str | Path, skip_special_tokens: bool = True) -> "QwenTextTokenizer":
        """Load a tokenizer :meth:`save` wrote (same ids and text as the :meth:`from_dir` it came from)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)), skip_special_tokens)
        except Exception as e:
            raise TextError(f"could not load the tokenizer file {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the whole tokenizer (BPE, pre-tokenizer, special tokens) as one ``tokenizers`` JSON file."""
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TextError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool | None = None) -> str:
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip)

    def byte_fallback_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` this tokenizer can only spell as raw UTF-8 bytes
        (no vocabulary entry holds the whole character: scripts the model was not trained on,
        private-use, zero-width and other rare characters), in order of appearance."""
        out: list[str] = []
        seen: set[str] = set()
        for c in text:
            if c in seen or c.isascii():
                continue
            seen.add(c)
            if self._is_byte_fallback(c):
                out.append(c)
        return out

    @functools.lru_cache(maxsize=4096)
    def _is_byte_fallback(self, ch: str) -> bool:
        # alone, a known character encodes to tokens each holding whole characters; an unknown one
        # to byte pieces, each of which decodes to an invalid (replacement) character
        ids = self.tokenizer.encode(ch, add_special_tokens=False).ids
        return any("\ufffd" in self.tokenizer.decode([i], skip_special_tokens=False) for i in ids) and ch != "\ufffd"

    def token_id(self, token: str) -> int:
        """Id of a (special) token string, read from the loaded vocabulary."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise TextError(f"token {token!r} is not in this tokenizer's vocabulary")
        return int(i)

    @property
    def endofprompt_id(self) -> int:
        return self.token_id("<|endofprompt|>")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size


# ----------------------------------------------------------------------------------- rules
_CHINESE = re.compile(r"[\u4e00-\u9fff]+")
_ONLY_PUNCT = regex.compile(r"^[\p{P}\p{S}]*$")


_INVISIBLE = regex.compile(r"[\s\p{Cf}]*")


ENDOFPROMPT = "<|endofprompt|>"
UNKNOWN_SPEAKER = "unknown"


def speaker_prompt(label: str | None) -> str:
    """The multi-speaker fine-tuning (mSFT) prefix of the LM text (paper section 2.8):
    ``"Speaker A<|endofprompt|>"`` for the label ``"A"``, ``"unknown<|endofprompt|>"`` when the
    label is missing or blank. Its tokens go before the text, where the official instruct path puts
    the instruction (``frontend_instruct2``: ``prompt_text`` = the tokens of the instruction, which
    the LM reads before the text tokens)."""
    label = "" if label is None else str(label).strip()
    if ENDOFPROMPT in label:
        raise TextError(f"speaker label {label!r} must not contain {ENDOFPROMPT}")
    return (f"Speaker {label}" if label else UNKNOWN_SPEAKER) + ENDOFPROMPT


def is_blank(text: str) -> bool:
    """True for text made only of whitespace and invisible format characters (zero-width space,
    joiners, word joiner, byte-order mark ...): nothing to speak."""
    return bool(_INVISIBLE.fullmatch(text))


def contains_chinese(text: str) -> bool:
    return bool(_CHINESE.search(text))


def replace_corner_mark(text: str) -> str:
    """Superscript 2/3 -> 平方 / 立方."""
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    """Drop full-width brackets and backticks; an em-dash pair becomes a blank."""
    for ch in ("（", "）", "【", "】", "`"):
        text = text.replace(ch, "")
    return text.replace("——", " ")


def spell_out_number(text: str, to_words: Callable[[str], str] | None = None) -> str:
    """Replace each run of digit characters by its English words (inflect)."""
    if to_words is None:
        if not any(c.isdigit() for c in text):  # no engine (its import costs ~2 s of CPU) without digits
            return text
        to_words = _inflect_engine().number_to_words
    out, start = [], None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(to_words(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(to_words(text[start:]))
    return "".join(out)


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    import inflect

    return inflect.engine()


def replace_blank(text: str) -> str:
    """Keep a blank only between two non-blank ASCII characters (drops blanks around CJK)."""
    out = []
    n = len(text)
    for i, c in enumerate(text):
        if c != " ":
            out.append(c)
            continue
        prev = text[i - 1]  # i == 0 looks at the last char, as the official code
        nxt = text[i + 1] if i + 1 < n else " "
        if nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
            out.append(c)
    return "".join(out)


def is_only_punctuation(text: str) -> bool:
    """True for strings made only of Unicode punctuation/symbols (or empty)."""
    return bool(_ONLY_PUNCT.fullmatch(text))


ZH_PUNCT = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_PUNCT = (".", "?", "!", ";", ":")


def split_paragraph(text: str, tokenize: Callable[[str], Sequence[int]], lang: str = "zh",
                    token_max_n: int = 80, token_min_n: int = 60, merge_len: int = 20,
                    comma_split: bool = False) -> list[str]:
    """Split a paragraph into synthesis pieces at sentence punctuation.

    Sentences are cut after each punctuation mark (a closing quote right after it stays with the
    sentence), then greedily joined while the joined length stays <= ``token_max_n`` or the
    current piece is still <= ``token_min_n``; a last piece shorter than ``merge_len`` is
    appended to the previous one. Length is characters for ``lang="zh"``, BPE tokens otherwise.
    """
    if not text:
        raise TextError("cannot split empty text")

    def length(s: str) -> int:
        return len(s) if lang == "zh" else len(tokenize(s))

    punct = list(ZH_PUNCT if lang == "zh" else EN_PUNCT)
    if comma_split:
        punct += ["，", ","]
    if text[-1] not in punct:
        text += "。" if lang == "zh" else "."
    sentences: list[str] = []
    start = 0
    for i, c in enumerate(text):
        if c not in punct:
            continue
        if i > start:
            sentences.append(text[start:i] + c)
        if i + 1 < len(text) and text[i + 1] in ('"', "”"):
            if sentences:  # a closing quote joins the sentence it ends (or the one before)
                sentences.append(sentences.pop(-1) + text[i + 1])
            start = i + 2
        else:
            start = i + 1
    pieces: list[str] = []
    cur = ""
    for s in sentences:
        if length(cur + s) > token_max_n and length(cur) > token_min_n:
            pieces.append(cur)
            cur = ""
        cur += s
    if cur:
        if pieces and length(cur) < merge_len:
            pieces[-1] += cur
        else:
            pieces.append(cur)
    return pieces


@functools.lru_cache(maxsize=2)
def _wetext(lang: str):
    try:
        from wetext import Normalizer
    except ImportError:
        return None
    if lang == "zh":
        return Normalizer(lang="zh", operator="tn", remove_erhua=False)
    return Normalizer(lang="en", operator="tn")


def wetext_available() -> bool:
    return _wetext("zh") is not None


def normalize(text: str, tokenize: Callable[[str], Sequence[int]], *, split: bool = True,
              use_wetext: bool | None = None, token_max_n: int = 80, token_min_n: int = 60,
              merge_len: int = 20) -> list[str] | str:
    """Official CosyVoice 2 text normalisation; returns the pieces (``split=True``) or the text.

    ``tokenize`` is the BPE encoder used to measure non-Chinese pieces (e.g.
    ``QwenTextTokenizer.encode``). ``use_wetext=None`` uses the wetext WFST normaliser when
    installed, ``False`` never, ``True`` requires it.
    """
    if not isinstance(text, str):
        raise TextError(f"text must be a str, got {type(text).__name__}")
    text = text.strip()
    if is_blank(text):
        raise TextError("text is empty (or only whitespace / zero-width characters); give the sentence to synthesise")
    if use_wetext and not wetext_available():
        raise TextError("use_wetext=True but the 'wetext' package is not installed: pip install wetext")
    use = wetext_available() if use_wetext is None else use_wetext
    if contains_chinese(text):
        if use:
            text = _wetext("zh").normalize(text)
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。").replace(" - ", "，")
        text = remove_bracket(text)
        text = re.sub(r"[，,、]+$", "。", text)
        lang = "zh"
    else:
        if use:
            text = _wetext("en").normalize(text)
        text = spell_out_number(text)
        lang = "en"
    if not split:
        return text
    pieces = split_paragraph(text, tokenize, lang, token_max_n, token_min_n, merge_len)
    pieces = [p for p in pieces if not is_only_punctuation(p)]
    if not pieces:
        raise TextError(f"text {text!r} has nothing to speak (only punctuation/symbols)")
    return pieces


class TextFrontend:
    """Tokenizer + normalisation, as the pipeline uses them."""

    def __init__(self, tokenizer: QwenTextTokenizer, use_wetext: bool | None = None):
        self.tokenizer = tokenizer
        self.use_wetext = use_wetext

    def normalize(self, text, split: bool = True, text_frontend: bool = True):
        """Like the official (git HEAD) ``text_normalize``: generators pass through untouched
        (bistream); ``text_frontend=False``, or text holding a ``<|...|>`` marker (HEAD skips the
        rules then so markers survive), returns the text as is (one piece)."""
        if isinstance(text, Iterator):
            return [text]
        if isinstance(text, str) and "<|" in text and "|>" in text:
            text_frontend = False
        if not text_frontend:
            if isinstance(text, str) and is_blank(text):
                raise TextError("text is empty (or only whitespace / zero-width characters); give the sentence "
                                "to synthesise")
            return [text] if split else text
        return normalize(text, self.tokenizer.encode, split=split, use_wetext=self.use_wetext)

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[int]:
        """Token ids of a text generator, one id at a time (bistream input)."""
        for piece in pieces:
            yield from self.tokenizer.encode(piece)
