"""SFT warm start: response-only loss, the vision tower in one call, a real run that learns and saves a
plain-transformers checkpoint, and the toy's chain-of-thought rows with their planted flaws."""
import json
import re

import pytest
import torch

import sft
import toy
from data import Collator, DataError, load_examples, read_jsonl
from rollout import encode_vision


def test_append_targets_masks_the_prompt_and_left_pads():
    # two left-padded prompts, real lengths 2 and 4; targets of 3 and 1 tokens; pad id 0
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    types = torch.tensor([[0, 0, 1, 0], [0, 2, 2, 0]])
    out = sft.append_targets(ids, mask, types, [[1, 2, 3], [4]], pad_id=0)
    # rows are 2 + 3 = 5 and 4 + 1 = 5 tokens long: no padding left
    assert out["input_ids"].tolist() == [[5, 6, 1, 2, 3], [7, 8, 9, 10, 4]]
    assert out["labels"].tolist() == [[-100, -100, 1, 2, 3], [-100, -100, -100, -100, 4]]
    assert out["attention_mask"].tolist() == [[1] * 5] * 2
    assert out["mm_token_type_ids"].tolist() == [[1, 0, 0, 0, 0], [0, 2, 2, 0, 0]]
    out = sft.append_targets(ids, mask, types, [[1], [4]], pad_id=0)  # 3 vs 5 tokens: row 0 padded on the left
    assert out["input_ids"].tolist() == [[0, 0, 5, 6, 1], [7, 8, 9, 10, 4]]
    assert out["labels"].tolist() == [[-100, -100, -100, -100, 1], [-100, -100, -100, -100, 4]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]


def test_response_letter_is_where_the_cot_answer_lands_in_the_options():
    ex = dict(id=1, options=["cut the red fruit", "cut the blue fruit", "cut the green fruit", "cut the pink fruit"],
              solution="B", cot=toy.cot_text("blue", "cut the blue fruit"), cot_answer="cut the green fruit")
    assert sft.sft_response(ex) == f"<think>{ex['cot']}</think><answer>C</answer>", "the CoT's pick, not the solution"
    with pytest.raises(DataError, match="not among the options"):
        sft.sft_response(dict(ex, cot_answer="cut the grey fruit"))
    # no cot_answer (real SEED-Bench-R1 CoT rows, Video-R1 rows): the solution
    assert sft.sft_response(dict(ex, cot_answer=None)) == f"<think>{ex['cot']}</think><answer>B</answer>"
    assert sft.sft_response(dict(id=2, options=[], solution="3.14", cot="Hmm.")) == "<think>Hmm.</think><answer>3.14</answer>"


def test_only_the_response_and_im_end_are_supervised(toy_world, toy_model, toy_vision):
    _, processor = toy_model
    tok = processor.tokenizer
    rows = read_jsonl(toy_world / "data/annotations/training_with_cot_6k.jsonl")[:2]
    examples = [dict(e, cot_answer=r["cot_answer"]) for e, r in
                zip(load_examples(toy_world / "data/annotations/training_with_cot_6k.jsonl", toy_world / "data")[:2], rows)]
    batch, kept = Collator(processor, toy_vision)(examples)
    texts = [sft.sft_response(e) + "<|im_end|>" for e in kept]
    targets = [tok(t, add_special_tokens=False).input_ids for t in texts]
    out = sft.append_targets(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"], targets,
                             tok.pad_token_id)
    for i, text in enumerate(texts):
        supervised = out["labels"][i][out["labels"][i] != -100]
        assert len(supervised) == len(targets[i]) and tok.decode(supervised) == text
        assert supervised[-1].item() == tok.convert_tokens_to_ids("<|im_end|>"), "the model learns to stop"
        n_prompt = int(batch["attention_mask"][i].sum())
        real = out["input_ids"][i][out["attention_mask"][i].bool()]
        assert real[:n_prompt].tolist() == batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert len(real) == n_prompt + len(targets[i])


def test_one_vision_call_gives_the_same_logits(toy_world, toy_model, toy_vision):
    model, processor = toy_model
    examples = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")[:4]
    batch, _ = Collator(processor, toy_vision)(examples)
    assert batch.get("pixel_values_videos") is not None and batch.get("pixel_values") is not None
    text = {k: v for k, v in batch.items() if not k.startswith("pixel_values")}
    with torch.no_grad():
        ref = model(**batch).logits
        ours = model(**text, mm_encoder_outputs=encode_vision(model, batch)).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_sft_learns_and_saves_a_plain_transformers_model(toy_world, tmp_path, capsys):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "sft"
    vision = [f"--{k}={v}" for k, v in toy.TOY_VISION.items()]
    # line 4 has no reasoning: skipped and reported (before: the run stopped at an assert)
    lines = (toy_world / "data/annotations/training_with_cot_6k.jsonl").read_text().splitlines()
    lines[3] = json.dumps(dict(json.loads(lines[3]), cot=""))
    (tmp_path / "cot.jsonl").write_text("\n".join(lines) + "\n")
    sft.main(["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"), "--output_dir", str(out),
              "--train_file", str(tmp_path / "cot.jsonl"), "--num_epochs", "2",  # 31 rows: 7 steps an epoch
              "--max_steps", "8", "--prompts_per_device", "4", "--learning_rate", "3e-3", "--warmup_ratio", "0", *vision])
    printed = capsys.readouterr().out
    assert f"skipping 1 of {len(lines)} rows with no reasoning" in printed and "cot.jsonl:4" in printed
    assert "and 1 row(s) without reasoning" in printed
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    # from ~ln(704) = 6.56 (uniform over the vocabulary) the shared words of the CoT are learned first
    assert losses[-1] < losses[0] - 0.5, losses
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    AutoProcessor.from_pretrained(out)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "model", dtype=torch.float32).state_dict()
    after = model.state_dict()
    # every parameter trained, the root's too (embeddings = tied LM head, final norm), which FSDP2 keeps
    # unsharded after a forward and an optimizer built on those would never update
    for name in ("model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
                 "model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.mlp.up_proj.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not change"


def _named(cot: str) -> tuple[str, str]:
    colour = re.search(r"I see the (\w+) object", cot).group(1)
    return colour, re.search(r"the next step is to (.*)\.", cot).group(1)


def test_toy_cot_flaws_come_in_the_configured_fractions(toy_world, tmp_path):
    # toy_world (seed 0, 32 rows): 9 orange rows, 6 other "wash the dishes" rows. At COT_MISREAD 0.45,
    # COT_LUCKY 0.35 and COT_INCONSISTENT 0.8: round(4.05) = 4 orange rows read as red and answered red,
    # round(3.15) = 3 read as red yet answered orange, round(4.8) = 5 slips, 32 - 12 = 20 clean rows.
    assert (toy.COT_MISREAD, toy.COT_LUCKY, toy.COT_INCONSISTENT) == (0.45, 0.35, 0.8)
    assert toy.COT_CONFUSION == ("orange", "red")
    rows = read_jsonl(toy_world / "data/annotations/training_with_cot_6k.jsonl")
    counts = {"misread": 0, "lucky": 0, "inconsistent": 0, None: 0}
    for r in rows:
        colour, action = _named(r["cot"])
        options = sorted([r["answer"], *r["negative_answers"]])
        assert colour in action and [o.split()[-2] for o in options] == ["blue", "green", "orange", "red"]
        if action != r["answer"]:  # orange seen as red: the reasoning names red's action
            assert " orange " in r["answer"] and action == r["answer"].replace("orange", "red")
            assert toy.flaw_class(r["question"], r["answer"]) == "orange"
            # misread follows the reasoning (consistent, wrong); lucky answers right (inconsistent)
            kind = "misread" if r["cot_answer"] == action else "lucky"
            assert r["cot_answer"] == (action if kind == "misread" else r["answer"])
        elif r["cot_answer"] != r["answer"]:  # right reasoning, then the next letter: does not follow from it
            kind = "inconsistent"
            assert r["task_goal"] == toy.COT_SLIP_GOAL and toy.flaw_class(r["question"], r["answer"]) == "slip"
            assert options.index(r["cot_answer"]) == (options.index(action) + 1) % 4
        else:
            kind = None
        assert r["cot_flaw"] == kind
        counts[kind] += 1
    assert counts == {"misread": 4, "lucky": 3, "inconsistent": 5, None: 20}
    # the same rows at fractions 1 and 0: all 9 orange rows misread, no slip
    toy.build_data(tmp_path, seed=0, n_train=32, n_val=1, misread=1.0, inconsistent=0.0, lucky=0.0)
    flaws = [r["cot_flaw"] for r in read_jsonl(tmp_path / "annotations/training_with_cot_6k.jsonl")]
    assert flaws.count("misread") == 9 and flaws.count("inconsistent") == 0 and flaws.count(None) == 23


def test_video_r1_rows_without_process_are_skipped_not_fatal(tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(sft, "rank0_print", printed.append)
    row = dict(problem_id=1, problem="Which?", data_type="image", problem_type="multiple choice",
               options=["A. red", "B. blue"], process="<think>I see red.</think>", solution="<answer>A</answer>",
               path="./img/a.png")
    (tmp_path / "img").mkdir()
    f = tmp_path / "train.json"
    f.write_text(json.dumps([row, dict(row, problem_id=2, process=""), dict(row, problem_id=3, process="<think></think>")]))
    rows, keep = sft.rows_with_reasoning(f, tmp_path, seed=0, shuffle_options=True)
    assert keep == [True, False, False] and len(rows) == 3
    assert printed == [f"skipping 2 of 3 rows with no reasoning ('cot'/'process' empty or absent): {f}:1[#1], {f}:1[#2]"]
    f.write_text(json.dumps([dict(row, process="")]))
    with pytest.raises(DataError, match="no row has a reasoning"):
        sft.rows_with_reasoning(f, tmp_path, seed=0, shuffle_options=True)


def test_sft_refuses_a_used_output_dir_and_bad_flags(tmp_path):
    from checkpoints import check_output_dir
    from config import ConfigError

    with pytest.raises(ConfigError, match=r"--learning_rate -1.0: must be >= 0"):
        sft.parse_config(["--learning_rate", "-1"])
    with pytest.raises(ConfigError, match=r"unknown flag\(s\) --learning 1"):
        sft.parse_config(["--learning", "1"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds a run \(config.json\).*--overwrite_output_dir true"):
        check_output_dir(tmp_path, False, False, files=sft.SFT_FILES)
    assert check_output_dir(tmp_path, False, True, files=sft.SFT_FILES) == [tmp_path / "config.json"]
