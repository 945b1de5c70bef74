"""SFT warm start: response-only loss, the vision tower in one call, a real run that learns and saves a
plain-transformers checkpoint, and the toy's chain-of-thought rows with their planted flaws."""
import copy
import json
import re

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

import sft
import toy
from data import Collator, DataError, load_examples, read_jsonl
from rollout import encode_vision


def test_target_ids_are_right_padded_with_their_mask():
    ids, mask = sft.target_ids([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_response_letter_is_where_the_cot_answer_lands_in_the_options():
    ex = dict(id=1, options=["cut the red fruit", "cut the blue fruit", "cut the green fruit", "cut the pink fruit"],
              solution="B", cot=toy.cot_text("blue", "cut the blue fruit"), cot_answer="cut the green fruit")
    assert sft.sft_response(ex) == f"<think>{ex['cot']}</think><answer>C</answer>", "the CoT's pick, not the solution"
    with pytest.raises(DataError, match="not among the options"):
        sft.sft_response(dict(ex, cot_answer="cut the grey fruit"))
    # no cot_answer (real SEED-Bench-R1 CoT rows, Video-R1 rows): the solution
    assert sft.sft_response(dict(ex, cot_answer=None)) == f"<think>{ex['cot']}</think><answer>B</answer>"
    assert sft.sft_response(dict(id=2, options=[], solution="3.14", cot="Hmm.")) == "<think>Hmm.</think><answer>3.14</answer>"


def test_loss_is_the_cross_entropy_of_the_targets_alone(toy_world, toy_model, toy_vision):
    # sft_loss (target positions only, chunked) = HF's loss from labels on the full logits: prompt + target
    # left-padded, labels -100 on prompt and padding (sft.py's loss before the chunked head)
    model, processor = copy.deepcopy(toy_model[0]), toy_model[1]
    with torch.no_grad():  # sharper predictions than the untrained toy's near-uniform ones (tied: the embedding too)
        model.lm_head.weight.mul_(5)
    tok = processor.tokenizer
    path = toy_world / "data/annotations/training_with_cot_6k.jsonl"
    examples, lengths = [], set()
    for e, r in zip(load_examples(path, toy_world / "data"), read_jsonl(path)):  # 3 rows of 3 target lengths
        n = len(tok(sft.sft_response(dict(e, cot_answer=r["cot_answer"]))).input_ids)
        if n not in lengths and len(examples) < 3:
            examples.append(dict(e, cot_answer=r["cot_answer"]))
            lengths.add(n)
    batch, kept = Collator(processor, toy_vision)(examples)
    texts = [sft.sft_response(e) + "<|im_end|>" for e in kept]
    targets = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert len({len(t) for t in targets}) > 1 and batch["attention_mask"].min() == 0, "padding on both sides"
    ids, mask = sft.target_ids(targets, tok.pad_token_id)
    assert [tok.decode(i[m.bool()]) for i, m in zip(ids, mask)] == texts  # the response and <|im_end|>: learnt to stop
    rows = {k: [] for k in ("input_ids", "labels", "attention_mask", "mm_token_type_ids")}
    for p_ids, p_mask, p_types, tgt in zip(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                           targets):
        real, tgt = p_mask.bool(), torch.tensor(tgt)
        rows["input_ids"].append(torch.cat([p_ids[real], tgt]))
        rows["labels"].append(torch.cat([torch.full((int(real.sum()),), -100), tgt]))
        rows["attention_mask"].append(torch.ones(len(rows["labels"][-1]), dtype=torch.long))
        rows["mm_token_type_ids"].append(torch.cat([p_types[real], torch.zeros_like(tgt)]))
    pad = {"input_ids": tok.pad_token_id, "labels": -100, "attention_mask": 0, "mm_token_type_ids": 0}
    full = {k: pad_sequence(v, batch_first=True, padding_value=pad[k], padding_side="left") for k, v in rows.items()}
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
    with torch.no_grad():
        expected = model(**full, **grids, mm_encoder_outputs=encode_vision(model, batch)).loss
        for chunk_size in (7, 512):
            assert sft.sft_loss(model, batch, targets, tok.pad_token_id, chunk_size).item() == \
                pytest.approx(expected.item(), rel=1e-6, abs=1e-5)


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
