"""A speed trick kept for scale: each prompt prefilled once for its G rows, not G times.

HF's `num_return_sequences` (and a prompt repeated G times) expands a prompt to G rows before its prefill:
G times the prompt's work (a 1,400-token SEED-Bench-R1 prompt at G = 8: 11,200 prefill tokens, not 1,400).
`shared_prefill` runs every prompt token but the last once per prompt and repeats the KV cache (and the 3D
rope offsets) for the G rows; `generate` continues from it and runs only the last prompt token per row. The
samples are those of a full prefill (tests/test_rollout.py). One call from rollout.generate_groups; a
`cache_implementation` set on the model (a static cache, which `generate` allocates itself) takes the plain
path there instead.
"""
from __future__ import annotations

ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
GRID_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def shared_prefill(model, prompts: dict, G: int) -> dict:
    """`generate` inputs for the G rows of each prompt of `prompts` (one left-padded row per prompt, vision
    features included), rows grouped by prompt, with the KV cache of every prompt token but the last."""
    inputs = {k: v[:, :-1] if k in ROW_KEYS else v for k, v in prompts.items()}  # the last token is text, never vision
    grids = {k: inputs[k] for k in GRID_KEYS if k in inputs}
    # explicit positions, as in completion_logprobs: never the rope_deltas an earlier call left on the model
    position_ids, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      attention_mask=inputs["attention_mask"], **grids)  # (3, B, P-1)
    cache = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(G)  # row b*G + g holds prompt b
    model.model.rope_deltas = deltas.repeat_interleave(G, 0)  # (B*G, 1): generate reads them for the later tokens
    return {**{k: prompts[k].repeat_interleave(G, 0) for k in ROW_KEYS}, "past_key_values": cache}
