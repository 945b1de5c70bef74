"""The toy world's model: a tiny but real Qwen2.5-VL (or Qwen2-VL), its tokenizer trained on the toy world's own
texts with Qwen's special tokens and chat template, or the 7B's tokenizer rebuilt offline (qwen_vocab.py).
toy.py builds it into DIR/model:

    build_model_dir(DIR / "model", DIR / "data")                    # what `python toy.py --out DIR` writes
    build_model_dir(DIR / "model", None, qwen=True)                 # the 7B's vocabulary, saved as published
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2TokenizerFast,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)

import qwen_vocab
from data import MC_INSTRUCTION, THINK_INSTRUCTION  # the prompt words are data.py's

# Qwen2.5-VL-Instruct's chat template, verbatim: default system turn, one
# <|vision_start|><|image_pad|><|vision_end|> per image, <|video_pad|> per video, text in order.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The Qwen special tokens, in Qwen's own id order (ids differ: the toy vocabulary is small).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


def corpus_texts(data: Path) -> list[str]:
    """Every string the toy model will read or write, to train its tokenizer on."""
    texts = [THINK_INSTRUCTION, MC_INSTRUCTION, "You are a helpful assistant.", "system\nuser\nassistant\n",
             "<think> </think> <answer>A</answer><answer>B</answer><answer>C</answer><answer>D</answer>",
             "Options:\nA. \nB. \nC. \nD. \n"]
    for f in sorted((data / "annotations").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            texts += [r["question"], r["answer"], *r["negative_answers"], r.get("cot", "")]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 640):
    """A byte-level BPE trained here, wrapped in Qwen's tokenizer class with Qwen's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2TokenizerFast(vocab=state["vocab"], merges=merges, unk_token=None, bos_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.model_max_length = 32768
    return tok


def build_processor(tokenizer, arch: str = "qwen2_5_vl"):
    # Qwen2.5-VL-7B-Instruct's preprocessor_config (Qwen2-VL-7B-Instruct's has the same values): min/max pixels,
    # CLIP mean/std, patch 14, merge 2, temporal 2
    pix = dict(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}, patch_size=14,
               temporal_patch_size=2, merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
               image_std=[0.26862954, 0.26130258, 0.27577711])
    cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=Qwen2VLImageProcessor(**pix), video_processor=Qwen2VLVideoProcessor(**pix),
               tokenizer=tokenizer, chat_template=QWEN25_VL_CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, vocab_size: int | None = None,
                tied: bool = True, arch: str = "qwen2_5_vl"):
    """A tiny Qwen2.5-VL, or with `arch` "qwen2_vl" a tiny Qwen2-VL (SEED-Bench-R1's study): the same text model;
    a vision tower without window attention, whose `hidden_size` is the LM's width (Qwen2.5-VL's out_hidden_size)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = vocab_size or (len(tokenizer) + 63) // 64 * 64
    heads = 4
    vision = (dict(depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2) if arch == "qwen2_vl" else
              dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                   tokens_per_second=2))
    config_class, model_class = ((Qwen2VLConfig, Qwen2VLForConditionalGeneration) if arch == "qwen2_vl" else
                                 (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration))
    config = config_class(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=tied,
                         # mrope splits head_dim/2 rotary pairs into (time, height, width), as 16:24:24 in 7B
                         rope_scaling={"type": "mrope", "mrope_section": _mrope_section(hidden // heads)},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    # Qwen's 0.02 suits width 3584; at width 64 it leaves attention logits so flat that the toy cannot
    # learn to copy a word 11 tokens back (chance after 800 steps). width^-0.5 learns it in < 100 steps.
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = hidden ** -0.5
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def build_model_dir(out: Path, data: Path, seed: int = 0, qwen: bool = False, arch: str = "qwen2_5_vl") -> None:
    """The toy model and processor, `save_pretrained` in `out`; `arch` "qwen2_vl": a tiny Qwen2-VL. qwen: with
    Qwen2.5-VL-7B-Instruct's tokenizer (qwen_vocab.py) and its 152,064-row vocabulary, saved as the 7B is published
    (bf16 safetensors shards with an index, an untied LM head, its generation_config's two EOS ids)."""
    if not qwen:
        tok = build_tokenizer(corpus_texts(data))
        build_model(tok, seed, arch=arch).save_pretrained(out)
        return build_processor(tok, arch).save_pretrained(out)
    tok = qwen_vocab.tokenizer()
    model = build_model(tok, seed, vocab_size=qwen_vocab.VOCAB_SIZE, tied=False, arch=arch).to(torch.bfloat16)
    model.generation_config.update(eos_token_id=[tok.eos_token_id, tok.pad_token_id], do_sample=True, top_k=1,
                                   temperature=0.1, top_p=0.001, repetition_penalty=1.05)
    model.save_pretrained(out, max_shard_size="30MB")  # 2 x 39 MB embeddings (bf16: 19.5 MB each): 3 shards
    build_processor(tok, arch).save_pretrained(out)
