"""Bad input fails fast, before any model is loaded, with one line naming the flag or file:line; a run never
ends "done" after losing its data; a used output dir is never clobbered. No model is loaded here except in
the one skip-budget run (the toy's, a few seconds)."""
import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import grpo_care
from data import DataError
import budgets
import checkpoints
import config
import sft
from config import ConfigError, RunAborted

ROOT = Path(__file__).resolve().parents[1]


def args(toy_world, out, *extra):
    return ["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
            "--output_dir", str(out), "--max_new_tokens", "4", "--num_generations", "2", *extra]


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """main() up to the first model load: any load raises ModelLoaded (the processor loads: the prompt-length
    check reads its tokenizer). The process group is torn down after."""
    def refuse(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(grpo_care, "load_model", refuse)
    monkeypatch.setattr(sft, "load_model", refuse)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def a_used_run(out):
    (out / "checkpoint-8").mkdir(parents=True)
    (out / "checkpoint-8" / "trainer_state.json").write_text(json.dumps({"step": 8, "config": {}}))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9)))


# --- 1. a used output dir ----------------------------------------------------------------------------

def test_a_used_output_dir_is_refused_and_left_alone(toy_world, tmp_path, no_models):
    # before: metrics.jsonl was cut to step <= 0 and checkpoint-2 written beside the old checkpoint-8
    a_used_run(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a run \(checkpoint-8, metrics.jsonl\): pass "
                                          r"--resume_from_checkpoint latest .* or --overwrite_output_dir true"):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8, "the history is untouched"


def test_overwrite_output_dir_deletes_the_old_run(toy_world, tmp_path, no_models):
    a_used_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoaded):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2", "--overwrite_output_dir", "true"))
    # a later --resume_from_checkpoint latest cannot pick the old run's checkpoint-8; other files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]  # .lock: this run's claim


def test_truncate_history_keeps_the_steps_not_redone(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "x"')  # cut by kill -9
    checkpoints.truncate_history(f, 2)
    assert [json.loads(line)["step"] for line in f.read_text().splitlines()] == [1, 2]
    checkpoints.truncate_history(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


# --- 2. the skip budget ---------------------------------------------------------------------------------

def test_skip_verdict():
    v = budgets.skip_verdict
    assert v(4, 4, 4, 4, 0.5) == "4 of this step's 4 samples are unreadable (more than --max_skip_frac 0.5)"
    assert v(2, 4, 2, 4, 0.5) is None  # half is not more than half
    assert v(1, 1, 1, 1, 0.5) is None  # a step of 1 and a run of 1 are not judged ...
    assert v(1, 1, 1, 1, 0.5, last_step=True).startswith("1 of the run's 1 samples")  # ... except at the end
    assert v(1, 1, 3, 5, 0.5) == "3 of the run's 5 samples are unreadable (more than --max_skip_frac 0.5)"
    assert v(1, 1, 3, 5, 1.0) is None and v(16, 16, 16, 16, 1.0) is None  # 1: never


def test_skip_log_summary():
    log = budgets.SkipLog()
    log.add(4, [(1, "/d/v1.mp4", "file not found"), (2, "/d/i2.png", "cannot decode (truncated)")])
    log.add(4, [(3, "/d/v3.mp4", "file not found")])
    assert log.summary() == ("skipped 3 of 8 samples (2 file not found, 1 cannot decode); first: "
                             "/d/v1.mp4: file not found; /d/i2.png: cannot decode (truncated); /d/v3.mp4: file not found")
    assert budgets.SkipLog(**asdict(log)) == log, "round-trips through trainer_state.json"


def test_a_missing_media_folder_fails_before_any_model(toy_world, tmp_path, no_models):
    # a wrong --data_root: the annotations are there, videos/ and images/ are not
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/training_6k.jsonl").write_text((toy_world / "data/annotations/training_6k.jsonl").read_text())
    with pytest.raises(DataError, match=r"training_6k\.jsonl: .*root/(videos|images)/\w+: no such directory \(\d+ "
                                        r"media files of this file are there; check --data_root\)"):
        grpo_care.main(args(toy_world, tmp_path / "out", "--data_root", str(root)))


def test_a_run_with_no_readable_sample_aborts(toy_world, tmp_path):
    # the folders are there, the files are not (a failed copy). Before: 16 warnings, exit 0, "done:"
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/training_6k.jsonl").write_text((toy_world / "data/annotations/training_6k.jsonl").read_text())
    for kind in ("videos", "images"):
        for d in (toy_world / "data" / kind).iterdir():
            (root / kind / d.name).mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(RunAborted, match=r"4 of this step's 4 samples are unreadable .*skipped 4 of 4 samples "
                                         r"\(4 file not found\); first: .*root/(videos|images)/"):
        grpo_care.main(args(toy_world, out, "--data_root", str(root), "--max_steps", "4", "--prompts_per_device", "4"))
    import torch.distributed as dist

    dist.destroy_process_group()
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


# --- 3. data checked before any model is loaded -----------------------------------------------------

def test_a_bad_annotation_row_fails_before_any_model(toy_world, tmp_path, no_models):
    rows = (toy_world / "data/annotations/training_6k.jsonl").read_text().splitlines()
    rows[5] = json.dumps({k: v for k, v in json.loads(rows[5]).items() if k != "answer"})
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:6: answer: missing field"):
        grpo_care.main(args(toy_world, tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl")))


def test_the_command_prints_one_line_without_traceback_even_under_python_O(toy_world, tmp_path):
    # a validation file with gold letter "E": an assert before, so `python -O` trained on it
    rows = (toy_world / "data/annotations/validation_L1.jsonl").read_text().splitlines()
    rows[1] = json.dumps(dict(json.loads(rows[1]), golden_choice_idx="E"))
    (tmp_path / "validation_bad.jsonl").write_text("\n".join(rows) + "\n")
    r = subprocess.run([sys.executable, "-O", str(ROOT / "grpo_care.py"), *args(toy_world, tmp_path / "out"),
                        "--train_file", str(tmp_path / "validation_bad.jsonl")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/validation_bad.jsonl:2: golden_choice_idx: 'E' is not one of A, B, C, D "
        f"(sample_id={json.loads(rows[1])['sample_id']})")


# --- 4. resume compares the config ---------------------------------------------------------------------

def a_checkpoint(toy_world, out, *flags):
    """A checkpoint-2 whose trainer_state.json holds the config of `flags` (no weights: nothing loads them)."""
    cfg = grpo_care.parse_config(args(toy_world, out, *flags))
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2/trainer_state.json").write_text(json.dumps({"step": 2, "config": asdict(cfg)}))
    checkpoints.write_manifest(out / "checkpoint-2")


def test_resume_refuses_a_flag_that_would_not_apply(toy_world, tmp_path, no_models):
    a_checkpoint(toy_world, tmp_path, "--learning_rate", "1e-3")
    with pytest.raises(ConfigError, match=r"learning_rate: 0.001 -> 0.002 \(the optimizer and the schedule restore "
                                          r"the checkpoint's\)"):
        grpo_care.main(args(toy_world, tmp_path, "--learning_rate", "2e-3", "--resume_from_checkpoint", "latest"))


def test_resume_lists_the_flags_that_apply(toy_world, tmp_path, no_models, capsys):
    a_checkpoint(toy_world, tmp_path, "--max_steps", "4")
    with pytest.raises(ModelLoaded):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "6", "--num_generations", "3",
                            "--resume_from_checkpoint", "latest"))
    printed = capsys.readouterr().out
    assert "resume: num_generations: 2 -> 3 (applies from step 3)" in printed
    assert "resume: max_steps: 4 -> 6 (applies from step 3)" in printed


def test_compare_resume_config():
    saved = dict(learning_rate=1e-6, consistency_reward="care", beta=0.0, seed=1, output_dir="a")
    assert checkpoints.compare_resume_config(saved, dict(saved, output_dir="b")) == ([], [])
    refused, applied = checkpoints.compare_resume_config(saved, dict(saved, consistency_reward="none", seed=2,
                                                                     new_flag=1))
    assert refused == ["reference model (a consistency reward or a KL): True -> False"]
    assert applied == ["consistency_reward: 'care' -> 'none'", "seed: 1 -> 2"]
    # with beta > 0 a reference is held either way: turning CARE off applies; another arm with a reference too
    assert checkpoints.compare_resume_config(dict(saved, beta=0.1), dict(saved, beta=0.1,
                                                                         consistency_reward="none"))[0] == []
    assert checkpoints.compare_resume_config(saved, dict(saved, consistency_reward="refgen"))[0] == []
    # an older checkpoint (use_care) against the new flag
    old = dict(learning_rate=1e-6, use_care=True, beta=0.0)
    assert checkpoints.compare_resume_config(old, dict(old, consistency_reward="none"))[0] == [
        "reference model (a consistency reward or a KL): True -> False"]


# --- 5. flags ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--num_generations", "1"], r"--num_generations 1: must be an integer >= 2"),  # before: zero gradient to the end
    (["--num_generations", "0"], r"--num_generations 0: must be an integer >= 2"),  # before: "1 completions vs 0"
    (["--save_steps", "0"], r"--save_steps 0: must be an integer >= 1"),  # before: ZeroDivisionError after a step
    (["--max_new_tokens", "0"], r"--max_new_tokens 0: must be an integer >= 1"),
    (["--temperature", "0"], r"--temperature 0.0: must be > 0"),
    (["--top_p", "1.5"], r"--top_p 1.5: must be in \(0, 1\]"),
    (["--learning_rate", "nan"], r"--learning_rate nan: must be >= 0"),
    (["--max_skip_frac", "2"], r"--max_skip_frac 2.0: must be in \[0, 1\]"),
    (["--max_steps", "0"], r"--max_steps 0: must be -1 or an integer >= 1"),
    (["--video_min_frames", "8", "--video_max_frames", "4"], r"--video_min_frames 8 must be <= --video_max_frames 4"),
    (["--num_generation", "4"], r"unknown flag\(s\) --num_generation 4 \(flags are not abbreviated"),  # before: accepted
    (["--model_path", "/no/such/dir", "--data_root", "/tmp"], r"--model_path /no/such/dir: no such directory"),
    (["--model_path", "/tmp", "--data_root", "/no/such/root"], r"--data_root /no/such/root: no such directory"),
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir", "true"], r"pass one of the two"),
])
def test_bad_flags_fail_at_parse_time(flags, message):
    with pytest.raises(ConfigError, match=message):
        grpo_care.parse_config(flags)


def test_sft_keeps_the_ranges_of_the_settings_it_redefaults():
    # SFTConfig redeclares learning_rate and max_grad_norm with its own defaults; their ranges are RunConfig's
    assert sft.parse_config(["--toy", "false"]).learning_rate == 1e-5  # the toy (default without --model_path): 3e-3
    with pytest.raises(ConfigError, match=r"--learning_rate -1.0: must be >= 0"):
        sft.parse_config(["--learning_rate", "-1"])
    with pytest.raises(ConfigError, match=r"--max_grad_norm 0.0: must be > 0"):
        sft.parse_config(["--max_grad_norm", "0"])


def test_resume_with_nothing_to_resume_names_the_flag(toy_world, tmp_path, no_models):
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint latest: no checkpoint in"):
        grpo_care.main(args(toy_world, tmp_path, "--resume_from_checkpoint", "latest"))


# --- 6. a full disk --------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_is_told_apart(error):
    try:
        try:
            raise OSError(errno.ENOSPC, "write failed")  # torch raises its RuntimeError while handling this
        except OSError:
            raise error  # noqa: B904
    except Exception as e:  # noqa: BLE001
        assert config.is_disk_full(e)
    assert not config.is_disk_full(ValueError("a bug"))  # anything else is not a disk problem


def test_a_full_disk_during_a_real_save_is_reported(toy_world, tmp_path, monkeypatch):
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunAborted, match=r"checkpoint-1: no space left on device"):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "1", "--consistency_reward", "none"))
    import torch.distributed as dist

    dist.destroy_process_group()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_an_older_transformers_is_refused_before_any_model(toy_world, tmp_path, monkeypatch, no_models):
    import transformers

    # 5.17.0 drops rollout.py's precomputed vision features without an error (bench/vision_features_check.py)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    argv = ["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
            "--output_dir", str(tmp_path / "out")]
    for main in (grpo_care.main, sft.main):
        with pytest.raises(ConfigError, match=r"transformers 5\.17\.0: 5\.23\.0 or later is needed"):
            main(argv)
    monkeypatch.setattr(transformers, "__version__", "5.23.1")
    config.validate_config(grpo_care.parse_config(argv))  # a later one passes
