"""The foundation: the toy Qwen2.5-VL round-trips through plain transformers, and data.py reads
SEED-Bench-R1 rows (the toy's, which share the real layout) into the reference prompt."""
import json

import pytest
import torch

import data
import toy
import toy_qwen
from data import Collator, DataError, load_examples, make_example, prompt_text, read_jsonl

TRAIN_ROW = dict(
    sample_id=7, video_source="EpicKitchens", video_id="v7", task_goal="wash the dishes",
    question="What next?", answer="dry the red cup",
    negative_answers=["dry the blue cup", "dry the green cup", "dry the yellow cup", "dry the purple cup"],
    task_progress_metadata=[dict(narration_text="rinse", start_frame=0, stop_frame=3)],
    video_basename="v7.mp4", current_observation_basename="v7.png")


def test_toy_model_round_trips_and_renders_qwen_chat(toy_world, toy_model):
    model, processor = toy_model
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert model.config.vision_config.patch_size == 14 and model.config.vision_config.spatial_merge_size == 2
    msgs = [dict(role="user", content=[dict(type="video", video="v.mp4"), dict(type="image", image="i.png"),
                                       dict(type="text", text="Hi?")])]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Qwen2.5-VL-Instruct's rendering: default system turn, video then image placeholders, text, assistant turn.
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")
    tok = processor.tokenizer
    for special in toy_qwen.SPECIAL_TOKENS:  # each special token is one id, never split by BPE
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    assert tok.decode(tok("<think>a</think><answer>B</answer>").input_ids) == "<think>a</think><answer>B</answer>"


def test_forward_with_video_and_image(toy_world, toy_model, toy_vision):
    model, processor = toy_model
    examples = [e for e in load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")
                if e["video"] is not None][:2]
    batch, kept = Collator(processor, toy_vision)(examples)
    assert len(kept) == 2
    # 4 frames of 56x56 -> grid (2, 4, 4) -> 32 patches / merge 4 = 8 video tokens; an image = 4 tokens
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert (batch["input_ids"] == model.config.video_token_id).sum().item() == 16
    assert (batch["attention_mask"][:, -1] == 1).all(), "left padding: the last position is real for every row"
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_video_time_positions_follow_the_sampled_fps(toy_world, toy_model, toy_vision):
    import decord

    _, processor = toy_model
    rows = [e for e in load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data") if e["video"]]
    frames = {e["id"]: len(decord.VideoReader(e["video"])) for e in rows}
    examples = [next(e for e in rows if frames[e["id"]] == 4), next(e for e in rows if frames[e["id"]] == 8)]
    batch, kept = Collator(processor, toy_vision)(examples)
    # both clips at 2 fps and sampled to 4 frames: 4 frames = 2 s -> 2 frames per grid step = 1.0 s;
    # 8 frames = 4 s -> 4 frames sampled at 1 fps -> 2.0 s (the reference's training would say 1.0)
    assert batch["second_per_grid_ts"].tolist() == [1.0, 2.0]


def test_toy_is_deterministic_and_cached(tmp_path):
    a = toy.build(tmp_path / "a", seed=3, n_train=6, n_val=4)
    b = toy.build(tmp_path / "b", seed=3, n_train=6, n_val=4)
    for name in ("training_6k.jsonl", "validation_L3.jsonl", "training_with_cot_6k.jsonl"):
        assert (a / "data/annotations" / name).read_text() == (b / "data/annotations" / name).read_text()
    stamp = (a / "model/model.safetensors").stat().st_mtime
    toy.build(tmp_path / "a", seed=3, n_train=6, n_val=4)  # same spec: reused, not rebuilt
    assert (a / "model/model.safetensors").stat().st_mtime == stamp


def test_toy_data_has_the_seed_bench_r1_layout(toy_world):
    ann = toy_world / "data/annotations"
    train = read_jsonl(ann / "training_6k.jsonl")
    for r in train:
        assert set(data.TRAIN_FIELDS) | {"video_id", "task_goal"} <= set(r)
        assert len(r["negative_answers"]) >= 3 and r["answer"] not in r["negative_answers"]
    assert any(not r["task_progress_metadata"] for r in train), "some rows are image-only, as in the real data"
    l3 = read_jsonl(ann / "validation_L3.jsonl")
    assert {r["domain"] for r in l3} == {"Daily life", "Hobbies", "Recreation", "Work"}
    for r in l3:
        assert r[f"choice_{r['golden_choice_idx'].lower()}"] == r["answer"]
        choices = [r[f"choice_{k}"] for k in "abcd"]
        assert choices == sorted(choices), "toy validation rows list options as --shuffle_options false trains"
        assert (toy_world / "data/images" / r["video_source"] / r["current_observation_basename"]).is_file()
    cot = read_jsonl(ann / "training_with_cot_6k.jsonl")
    r = cot[0]
    assert r["answer"].split(" the ")[1].split()[0] in r["cot"], "the reasoning names the colour cue"


def test_prompt_is_the_reference_text():
    golden = ("What next?Options:\nA. x\nB. y\nC. z\nD. w\n\n"
              "Please think about this question as if you were a human pondering deeply. Engage in an internal "
              "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it "
              "down', etc, or other natural language thought expressions It's encouraged to include "
              "self-reflection or verification in the reasoning process. Provide your detailed reasoning between "
              "the <think> </think> tags, and then give your final answer between the <answer> </answer> tags. "
              "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert prompt_text("What next?", ["x", "y", "z", "w"]) == golden


def test_training_options_are_seeded_and_reshuffle_per_epoch():
    a = make_example(TRAIN_ROW, "/root", seed=0, epoch=0)
    assert make_example(TRAIN_ROW, "/root", seed=0, epoch=0)["options"] == a["options"]
    assert a["options"][ord(a["solution"]) - 65] == "dry the red cup"
    assert len(set(a["options"])) == 4 and set(a["options"]) <= {TRAIN_ROW["answer"], *TRAIN_ROW["negative_answers"]}
    epochs = {tuple(make_example(TRAIN_ROW, "/root", seed=0, epoch=e)["options"]) for e in range(8)}
    assert len(epochs) > 1, "a new epoch draws new options"
    assert a["video"] == "/root/videos/EpicKitchens/v7.mp4" and a["image"] == "/root/images/EpicKitchens/v7.png"


def test_unshuffled_options_are_alphabetical_with_the_same_draw():
    shuffled = make_example(TRAIN_ROW, "/root", seed=0, epoch=0)
    ordered = make_example(TRAIN_ROW, "/root", seed=0, epoch=0, shuffle_options=False)
    assert ordered["options"] == sorted(shuffled["options"]), "the same 3 distractors, in alphabetical order"
    assert ordered["options"][ord(ordered["solution"]) - 65] == "dry the red cup"
    # the toy's four colours: every training row shows blue, green, orange, red as A, B, C, D
    row = dict(TRAIN_ROW, negative_answers=["dry the orange cup", "dry the blue cup", "dry the green cup"])
    assert make_example(row, "/r", shuffle_options=False)["options"] == [
        "dry the blue cup", "dry the green cup", "dry the orange cup", "dry the red cup"]


def test_validation_rows_keep_file_order_and_image_only_rows_have_no_video():
    row = dict(TRAIN_ROW, task_progress_metadata=[], choice_a="p", choice_b="q", choice_c="dry the red cup",
               choice_d="s", golden_choice_idx="C", domain="Work")
    ex = make_example(row, "/root", validation=True)
    assert ex["options"] == ["p", "q", "dry the red cup", "s"] and ex["solution"] == "C"
    assert ex["video"] is None and ex["domain"] == "Work"
    content = data.messages(ex, data.VisionSpec())[0]["content"]
    assert [c["type"] for c in content] == ["image", "text"]
    content = data.messages(make_example(TRAIN_ROW, "/r"), data.VisionSpec())[0]["content"]
    assert [c["type"] for c in content] == ["video", "image", "text"], "reference order: video, image, text"


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(TRAIN_ROW) + "\n" + '{"sample_id": 8, "question": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(f)


def test_missing_field_names_field_and_sample(tmp_path):
    row = dict(TRAIN_ROW)
    del row["negative_answers"]
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: negative_answers: missing field \(sample_id=7\)"):
        load_examples(tmp_path / "a.jsonl", tmp_path)


def test_corrupt_video_and_missing_image_are_skipped_and_counted(toy_world, toy_model, toy_vision, tmp_path, caplog):
    _, processor = toy_model
    examples = [e for e in load_examples(toy_world / "data/annotations/training_6k.jsonl", toy_world / "data")
                if e["video"] is not None][:3]
    broken = tmp_path / "broken.mp4"
    raw = open(examples[0]["video"], "rb").read()
    broken.write_bytes(raw[: len(raw) // 2])  # truncated mid-stream, like an interrupted download
    examples[0] = dict(examples[0], video=str(broken))
    examples[1] = dict(examples[1], image=str(tmp_path / "nowhere.png"))
    collate = Collator(processor, toy_vision)
    batch, kept = collate(examples)
    assert [e["id"] for e in kept] == [examples[2]["id"]], "bad samples dropped, never replaced"
    assert batch["input_ids"].shape[0] == 1 and collate.skipped == 2
    text = caplog.text
    assert "broken.mp4" in text and "nowhere.png: file not found" in text
    assert collate(examples[:2]) == (None, []) and collate.skipped == 4


def test_images_are_resized_as_configured(toy_world, toy_model):
    _, processor = toy_model
    ex = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")[0]
    # the reference cap, 256*28*28 px: the 56x56 toy image is kept (it is above the 4*28*28 floor)
    batch, _ = Collator(processor, data.VisionSpec())([dict(ex, video=None)])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    # a floor of 16*28*28 px upsamples it to 112x112 = 8x8 patches
    batch, _ = Collator(processor, data.VisionSpec(image_min_pixels=16 * 28 * 28))([dict(ex, video=None)])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]


VAL_ROW = dict(TRAIN_ROW, choice_a="p", choice_b="q", choice_c="dry the red cup", choice_d="s", golden_choice_idx="C")


@pytest.mark.parametrize("change, message", [
    # without golden_choice_idx the row used to be read as a training row: options redrawn from negative_answers
    (dict(golden_choice_idx=None), r"validation_L1\.jsonl:2: golden_choice_idx: missing field"),
    # ... and without negative_answers too the message blamed negative_answers
    (dict(golden_choice_idx=None, negative_answers=None), r":2: golden_choice_idx: missing field"),
    # an assert before, so `python -O` accepted a letter that can never be scored right
    (dict(golden_choice_idx="E"), r":2: golden_choice_idx: 'E' is not one of A, B, C, D \(sample_id=7\)"),
    (dict(choice_d=None), r":2: choice_d: missing field"),
])
def test_a_validation_file_is_checked_as_validation_rows(tmp_path, change, message):
    bad = {k: v for k, v in {**VAL_ROW, **change}.items() if v is not None}
    f = tmp_path / "validation_L1.jsonl"
    f.write_text(json.dumps(VAL_ROW) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(f, tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(negative_answers=["a", "b"]), r"negative_answers: expected a list of at least 3 strings"),
    (dict(negative_answers="dry the blue cup"), r"negative_answers: expected a list of at least 3 strings"),
    (dict(video_basename=""), r"video_basename: expected a non-empty string"),  # the row has a video
    (dict(question=""), r"question: expected a non-empty string"),
    (dict(task_progress_metadata=None), r"task_progress_metadata: missing field"),
    # before: accepted, and the prompt showed two identical options of which one was scored wrong
    (dict(negative_answers=["dry the blue cup", "dry the red cup", "dry the green cup"]),
     r"negative_answers: item 1 'dry the red cup' is the answer \(sample_id=7\)"),
    (dict(negative_answers=["dry the blue cup", "dry the green cup", "dry the red cup "]), r"negative_answers: item 2 .* is the answer"),
    # before: an option "B. " in the prompt
    (dict(negative_answers=["dry the blue cup", "", "dry the green cup"]), r"negative_answers: item 1 is empty"),
    (dict(negative_answers=["dry the blue cup", "dry the green cup", "  "]), r"negative_answers: item 2 is empty"),
    # before: read and trained on, files outside --data_root
    (dict(video_basename="/etc/v7.mp4"), r"video_basename: '/etc/v7.mp4' leads outside --data_root"),
    (dict(video_basename="../../../v7.mp4"), r"video_basename: '\.\./\.\./\.\./v7\.mp4' leads outside --data_root"),
    (dict(current_observation_basename="a/../../../../v7.png"), r"current_observation_basename: .* leads outside"),
    (dict(video_source="../.."), r"video_source: '\.\./\.\.' leads outside --data_root"),
    (dict(video_source="/data"), r"video_source: '/data' leads outside --data_root"),
])
def test_bad_training_rows_name_line_and_field(tmp_path, change, message):
    bad = {k: v for k, v in {**TRAIN_ROW, **change}.items() if v is not None}
    f = tmp_path / "training_6k.jsonl"
    f.write_text("\n" + json.dumps(TRAIN_ROW) + "\n" + json.dumps(bad) + "\n")  # blank line 1: lines, not rows
    with pytest.raises(DataError, match=r"training_6k\.jsonl:3: " + message):
        load_examples(f, tmp_path)


def test_rows_of_a_json_list_are_named_by_line(tmp_path):
    # row 0 opens on line 2, row 1 on line 5: the message points at the line where the bad object opens
    text = "[\n" + json.dumps(TRAIN_ROW, indent=None) + ",\n\n\n" + json.dumps(dict(TRAIN_ROW, question="")) + "\n]"
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(DataError, match=r"t\.json:5\[#1\]: question"):
        load_examples(tmp_path / "t.json", tmp_path)
    with pytest.raises(DataError, match=r"nowhere\.jsonl: annotation file not found"):
        load_examples(tmp_path / "nowhere.jsonl", tmp_path)


def test_a_bad_image_is_reported_under_its_own_path(toy_world, toy_model, toy_vision, tmp_path):
    _, processor = toy_model
    examples = [e for e in load_examples(toy_world / "data/annotations/training_6k.jsonl", toy_world / "data")
                if e["video"] is not None][:2]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    examples = [dict(examples[0], image=str(tmp_path / "empty.png")), dict(examples[1], image=str(tmp_path / "garbage.png"))]
    collate = Collator(processor, toy_vision)
    assert collate(examples) == (None, [])
    (_, p0, r0), (_, p1, r1) = collate.failures
    assert p0.endswith("empty.png") and r0 == "empty file (0 bytes)"
    assert p1.endswith("garbage.png") and r1.startswith("cannot decode"), (p1, r1)


def test_media_paths_inside_data_root_stay_allowed(tmp_path):
    # '..' that stays below --data_root, subfolders, and a symlinked videos/ folder (common on clusters):
    # the path is judged by its text, so the link's target may lie anywhere
    (tmp_path / "elsewhere/EpicKitchens").mkdir(parents=True)
    (tmp_path / "root/images/EpicKitchens").mkdir(parents=True)
    (tmp_path / "root/videos").symlink_to(tmp_path / "elsewhere")
    rows = [dict(TRAIN_ROW), dict(TRAIN_ROW, sample_id=8, video_basename="../../images/EpicKitchens/v7.mp4"),
            dict(TRAIN_ROW, sample_id=9, current_observation_basename="sub/dir/v9.png")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = load_examples(tmp_path / "t.jsonl", tmp_path / "root")
    assert a["video"] == f"{tmp_path}/root/videos/EpicKitchens/v7.mp4"
    assert b["video"] == f"{tmp_path}/root/videos/EpicKitchens/../../images/EpicKitchens/v7.mp4"
    assert c["image"] == f"{tmp_path}/root/images/EpicKitchens/sub/dir/v9.png"
    data.check_media_dirs([a], "t.jsonl")  # videos/EpicKitchens exists through the link


@pytest.mark.parametrize("name, second, message", [
    # before: both rows were read; their seeds and completions.jsonl keys collided
    ("training_6k.jsonl", 7, r"training_6k\.jsonl:3: sample_id: 7 is also the id of the row at .*training_6k\.jsonl:1$"),
    # before: evaluation kept one record per id, so two rows counted once; 7 and "7" are one key there
    ("validation_L1.jsonl", "7", r"validation_L1\.jsonl:3: sample_id: '7' is also the id of the row at .*:1$"),
])
def test_duplicate_sample_ids_are_refused(tmp_path, name, second, message):
    row = VAL_ROW if name.startswith("validation") else TRAIN_ROW
    rows = [row, dict(row, sample_id=8), dict(row, sample_id=second)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        load_examples(tmp_path / name, tmp_path)


def test_a_huge_question_is_refused_by_its_token_count_before_any_model(toy_world, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world / "model")
    rows = [TRAIN_ROW, dict(TRAIN_ROW, sample_id=8, question="wash the red cup " * 300_000)]  # 5 MB, judged by its head
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(tmp_path / "t.jsonl", tmp_path)
    # before: no bound; the run reached the model and tried to allocate ~1 TB for its attention
    with pytest.raises(DataError, match=r"t\.jsonl:2: question: the prompt is over \d+ tokens \(its first 262\d\d\d "
                                        r"characters alone are \d+\), more than --max_prompt_length 16384 \(sample 8\)$"):
        data.check_prompt_lengths(examples, tok, 16384)
    n = len(tok(examples[0]["prompt"], add_special_tokens=False).input_ids)
    data.check_prompt_lengths(examples[:1], tok, n)  # exactly at the bound: fits
    # the four options' text is longer than "What next?": the options are named
    with pytest.raises(DataError, match=rf"t\.jsonl:1: options: the prompt is {n} tokens, more than --max_prompt_length {n - 1} "):
        data.check_prompt_lengths(examples[:1], tok, n - 1)


def test_a_prompt_too_long_with_its_media_is_skipped_and_named(toy_world, toy_model, toy_vision):
    _, processor = toy_model
    examples = [e for e in load_examples(toy_world / "data/annotations/training_6k.jsonl", toy_world / "data")
                if e["video"] is not None][:2]
    long = dict(examples[0], prompt=examples[0]["prompt"] + " wash the red cup" * 40)
    batch, _ = Collator(processor, toy_vision)([examples[1]])
    n = int(batch["attention_mask"].sum())  # text and media tokens of the short prompt
    collate = Collator(processor, toy_vision, max_prompt_length=n)
    batch, kept = collate([long, examples[1]])
    assert [e["id"] for e in kept] == [examples[1]["id"]] and batch["input_ids"].shape == (1, n)
    ((sid, where, reason),) = collate.failures
    assert sid == long["id"] and where == long["where"] and where.endswith(f"training_6k.jsonl:{where.split(':')[-1]}")
    assert reason.startswith("prompt too long (") and reason.endswith(f"more than --max_prompt_length {n})")
    assert collate([long]) == (None, []) and collate.skipped == 2
