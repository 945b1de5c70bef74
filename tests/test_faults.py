"""Faults and hostile input (issue #24): damaged checkpoints are found before use, two runs never share an
output_dir, a full disk is one line and exit status 2, a diverged run stops, nothing from a checkpoint runs
code. Pure functions where they suffice; the toy runs a few steps where only a real save will do."""
import errno
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

import budgets
import checkpoints
import config
import grpo_care
import logs
from config import ConfigError, RunAborted
from data import DataError



def args(toy_world, out, *extra):
    return ["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
            "--output_dir", str(out), "--max_new_tokens", "4", "--num_generations", "2", "--consistency_reward", "none", *extra]


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """main() up to the first model load (the processor still loads: its tokenizer bounds the prompts)."""
    def refuse(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(grpo_care, "load_model", refuse)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def group():
    """A 1-process gloo group, as main() makes, for the collectives called directly."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def a_checkpoint(path: Path, step: int) -> Path:
    """A fake checkpoint-<step> with a real manifest: the files the save writes, small."""
    ckpt = path / f"checkpoint-{step}"
    (ckpt / "train_state").mkdir(parents=True)
    (ckpt / "train_state/__0_0.distcp").write_bytes(bytes(range(256)) * 64)  # 16 KB
    (ckpt / "train_state/.metadata").write_bytes(b"meta" * 10)
    (ckpt / "scheduler.pt").write_bytes(b"s" * 100)
    (ckpt / "rng_state_0.pt").write_bytes(b"r" * 100)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "config": {}}))
    checkpoints.write_manifest(ckpt)
    return ckpt


# --- damaged checkpoints -------------------------------------------------------------------------------------

def flip(path: Path, at: int, n: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + n] = bytes(255 - b for b in raw[at:at + n])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, problem", [
    # before: a traceback without the file's name after the models loaded, or (flipped bytes) a silent load
    (lambda c: (c / "train_state/__0_0.distcp").write_bytes((c / "train_state/__0_0.distcp").read_bytes()[:5000]),
     r"train_state/__0_0\.distcp: 5000 bytes, the manifest says 16384"),
    (lambda c: flip(c / "train_state/__0_0.distcp", 8000, 4096),
     r"train_state/__0_0\.distcp: contents differ from the manifest's sha256 \(corrupt\)"),
    (lambda c: (c / "scheduler.pt").unlink(), r"scheduler\.pt: missing"),
    (lambda c: (c / "rng_state_0.pt").unlink(), r"rng_state_0\.pt: missing"),
    (lambda c: (c / "train_state/.metadata").unlink(), r"train_state/\.metadata: missing"),
    (lambda c: (c / "manifest.json").unlink(), r"manifest\.json: missing \(the save did not finish"),
    (lambda c: (c / "manifest.json").write_text('{"a": [1,'), r"manifest\.json: unreadable"),
    (lambda c: (c / "manifest.json").write_text('{"../../etc/passwd": [1, "x"]}'), r"is outside the checkpoint"),
])
def test_a_damaged_checkpoint_is_named_by_its_file(tmp_path, damage, problem):
    ckpt = a_checkpoint(tmp_path, 2)
    assert checkpoints.checkpoint_problem(ckpt) is None
    (ckpt / "eval_seed_bench_r1").mkdir()  # files added after the save (evaluate.py's default output) are not judged
    (ckpt / "eval_seed_bench_r1/results.json").write_text("{}")
    assert checkpoints.checkpoint_problem(ckpt) is None
    damage(ckpt)
    assert __import__("re").search(problem, checkpoints.checkpoint_problem(ckpt))
    # an explicit path that is bad: one line naming the file
    with pytest.raises(ConfigError, match=rf"^--resume_from_checkpoint {ckpt}: {ckpt}/.*" + problem):
        checkpoints.find_resume_checkpoint(tmp_path, str(ckpt))


def test_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, capsys):
    for step in (1, 2, 3):
        a_checkpoint(tmp_path, step)
    flip(tmp_path / "checkpoint-3/train_state/__0_0.distcp", 100, 10)
    (tmp_path / "checkpoint-2/rng_state_0.pt").unlink()
    (tmp_path / "checkpoint-4.tmp").mkdir()  # a save cut short
    # before: int() of '2.bak' raised ValueError; a user's copy or notes are not checkpoints
    a_checkpoint(tmp_path, 9).rename(tmp_path / "checkpoint-9.bak")
    (tmp_path / "checkpoint-notes").mkdir()
    assert checkpoints.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"resume: checkpoint-3 is damaged, passed over ({tmp_path}/checkpoint-3/train_state/__0_0.distcp: contents "
        "differ from the manifest's sha256 (corrupt))",
        f"resume: checkpoint-2 is damaged, passed over ({tmp_path}/checkpoint-2/rng_state_0.pt: missing)",
        "resume: the newest good checkpoint is checkpoint-1"]
    (tmp_path / "checkpoint-1/trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"latest: no good checkpoint in .* \(3 damaged, the newest: .*checkpoint-3/"):
        checkpoints.find_resume_checkpoint(tmp_path, "latest")
    assert checkpoints.last_checkpoint_before(tmp_path, 3) == tmp_path / "checkpoint-2"
    assert checkpoints.last_checkpoint_before(tmp_path, 1) is None


@pytest.fixture(scope="module")
def two_steps(toy_world, tmp_path_factory):
    """A real toy run of 2 steps with a checkpoint after each (a few seconds)."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("two_steps"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        grpo_care.main(args(toy_world, out, "--max_steps", "2", "--save_steps", "1"))
    (out / "printed.txt").write_text(printed.getvalue())  # beside the checkpoints, not in them
    return out


def test_a_real_checkpoint_is_verified_before_any_model(two_steps, toy_world, tmp_path, no_models, capsys):
    import shutil

    out = shutil.copytree(two_steps, tmp_path / "out")
    assert sorted(json.loads((out / "checkpoint-2/manifest.json").read_text())) == sorted(
        p.relative_to(out / "checkpoint-2").as_posix() for p in (out / "checkpoint-2").rglob("*")
        if p.is_file() and p.name != "manifest.json")
    flip(out / "checkpoint-2/train_state/__0_0.distcp", 4096, 4096)  # before: loaded silently, changing the run
    with pytest.raises(ModelLoaded):  # resumes from checkpoint-1, saying why
        grpo_care.main(args(toy_world, out, "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    printed = capsys.readouterr().out
    assert "resume: checkpoint-2 is damaged, passed over (" in printed and "newest good checkpoint is checkpoint-1" in printed
    with pytest.raises(ConfigError, match=r"checkpoint-2/train_state/__0_0\.distcp: contents differ"):
        grpo_care.main(args(toy_world, out, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2")))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_a_crafted_scheduler_file_runs_no_code(two_steps, toy_world, tmp_path, monkeypatch):
    import shutil

    out = shutil.copytree(two_steps, tmp_path / "out")
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    torch.save(Payload(), out / "checkpoint-2/scheduler.pt")
    checkpoints.write_manifest(out / "checkpoint-2")  # whoever crafted it rewrote the manifest too
    # before: torch.load(weights_only=False) ran the payload, then failed
    try:
        with pytest.raises(ConfigError, match=r"checkpoint-2/scheduler\.pt: not a plain tensor file, refused"):
            grpo_care.main(args(toy_world, out, "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        assert not mark.exists(), "the crafted file ran its code"


# --- one run per output_dir ---------------------------------------------------------------------------------

def hold(out: Path, held) -> None:  # another run: claims the dir (no process group: rank 0), then works on
    checkpoints.claim_output_dir(out)
    held.set()
    time.sleep(120)


def test_a_second_run_sees_the_lock_at_once_and_a_killed_one_leaves_none(toy_world, tmp_path, no_models):
    import multiprocessing

    out, ctx = tmp_path / "out", multiprocessing.get_context("fork")  # fork: no second start-up of torch
    held = ctx.Event()
    holder = ctx.Process(target=hold, args=(out, held))
    holder.start()
    try:
        assert held.wait(60)
        # before: both runs went on, logged every step twice and both ended "done"
        start = time.time()
        with pytest.raises(ConfigError, match=rf"--output_dir {out} is in use by another run \(pid {holder.pid} on "):
            grpo_care.main(args(toy_world, out, "--max_steps", "1"))
        assert time.time() - start < 30  # before any model or data
        dist.destroy_process_group()
    finally:
        holder.kill()  # SIGKILL, a crash: the kernel drops its flock
        holder.join()
    with pytest.raises(ModelLoaded):  # no stale lock: the next run goes ahead at once
        grpo_care.main(args(toy_world, out, "--max_steps", "1"))


def test_a_second_evaluation_into_one_output_dir_stops_before_any_model(toy_world, tmp_path, monkeypatch):
    import multiprocessing

    import evaluate as ev

    monkeypatch.setattr(ev, "load_eval_model", lambda *a, **k: pytest.fail("a model was loaded"))
    ctx, out = multiprocessing.get_context("fork"), tmp_path / "eval"
    held = ctx.Event()
    holder = ctx.Process(target=hold, args=(out, held))
    holder.start()
    try:
        assert held.wait(60)
        # before: both appended to one predictions.jsonl
        with pytest.raises(ConfigError, match=rf"--output_dir {out} is in use by another run \(pid {holder.pid} "):
            ev.main(["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
                     "--output_dir", str(out), "--toy"])
    finally:
        holder.kill()
        holder.join()


# --- a full disk ----------------------------------------------------------------------------------------------

def checkpoint_exception(exc: BaseException) -> CheckpointException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return CheckpointException("Failed to save", {0: (e, traceback.extract_tb(e.__traceback__))})


@pytest.mark.parametrize("error, where", [
    # before: torch's CheckpointException (a BaseException) escaped as a traceback, rc 1
    (checkpoint_exception(OSError(errno.ENOSPC, "No space left on device")), "a write"),
    # predictions.jsonl, results.json (evaluate.py), the end of a run: any write the loop does not handle itself
    (OSError(errno.ENOSPC, "No space left on device", "out/predictions.jsonl"), "out/predictions.jsonl"),
])
def test_a_full_disk_is_one_line_and_status_2(error, where, capsys):
    def main():
        raise error

    assert config.is_disk_full(error)
    with pytest.raises(SystemExit) as exit_:
        config.run_cli(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {where}: no space left on device; free space, then rerun (a training run: --resume_from_checkpoint "
        "latest keeps the steps of its checkpoints)"]
    with pytest.raises(CheckpointException):  # a checkpoint failure of another kind still raises
        config.run_cli(lambda: (_ for _ in ()).throw(checkpoint_exception(ValueError("a bug"))))


def test_a_full_disk_in_the_checkpoint_main_write_leaves_the_earlier_whole(toy_world, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item

    def full(*a, **k):  # the sharded training state of checkpoint-2 hits a full disk
        if any("checkpoint-2" in str(x) for x in a):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(RunAborted, match=r"checkpoint-2: no space left on device while saving \(the earlier "
                                         r"checkpoints are intact\)"):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2", "--save_steps", "1"))
    dist.destroy_process_group()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"], "no partial checkpoint-2.tmp"
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-1") is None


def test_a_full_disk_while_logging_is_run_aborted(tmp_path, group):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "completions.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    # before: an OSError traceback
    with pytest.raises(RunAborted, match=rf"^{tmp_path}/completions\.jsonl: no space left on device while logging "
                                         r"step 2 .* resume with --resume_from_checkpoint latest$"):
        logs.write_logs(tmp_path, {"step": 2}, [{"step": 2, "text": "x"}])


# --- runaway updates ------------------------------------------------------------------------------------------

def test_update_log_and_verdict():
    u = budgets.UpdateLog()
    u.add(1, [True])
    u.add(2, [False, True])  # mu = 2: one of the step's two updates skipped
    u.add(3, [False])
    u.add(4, [False])
    assert (u.total, u.skipped, u.streak, u.first_bad_step()) == (5, 3, 2, 2)
    assert u.summary() == "3 of 5 updates skipped as non-finite (loss or gradient norm)"
    v = budgets.update_verdict
    assert v(2, 2, 5, max_streak=2, max_frac=0.1) is None  # 2 in a row allowed; 5 updates: too few to judge
    assert v(3, 3, 5, 2, 0.1) == "3 updates in a row were skipped as non-finite (more than --max_nonfinite_streak 2)"
    assert v(0, 1, 10, 2, 0.1) is None  # 1 of 10 = 0.1: not more than 0.1
    assert v(0, 2, 10, 2, 0.1) == ("2 of the last 10 updates were skipped as non-finite (more than "
                                   "--max_nonfinite_frac 0.1)")
    assert v(0, 1, 9, 2, 0.1) is None and v(0, 10, 50, 2, 1.0) is None  # 9 updates: not judged; 1: never
    u.add(5, [True] * 60)  # the window keeps the last 50 updates only
    assert len(u.recent) == budgets.UPDATE_WINDOW and u.first_bad_step() is None and u.streak == 0


def test_a_diverged_run_stops_naming_the_last_checkpoint_before_it(toy_world, tmp_path, monkeypatch, capsys):
    real = grpo_care.policy_loss

    def nan_from_step_2(*a, **k):  # every update from step 2 on is skipped, as after --learning_rate 1e6
        loss, stats = real(*a, **k)
        return loss * (float("nan") if len(list(tmp_path.glob("checkpoint-*"))) >= 1 else 1.0), stats

    monkeypatch.setattr(grpo_care, "policy_loss", nan_from_step_2)
    # before: every step skipped after the first, and the run ended "done", rc 0
    with pytest.raises(RunAborted, match=(
            r"^3 updates in a row were skipped as non-finite \(more than --max_nonfinite_streak 2\); 3 of 4 updates "
            rf"skipped as non-finite .*; the weights have likely diverged\. the last checkpoint before step 2, the "
            rf"first skipped, is {tmp_path}/checkpoint-1: start a new run from it")):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "6", "--save_steps", "1"))
    dist.destroy_process_group()
    # no checkpoint of the step that tipped it over
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_the_end_of_a_run_counts_the_skipped_updates(two_steps):
    # before: the end of a run said nothing of its skipped updates
    printed = (two_steps / "printed.txt").read_text().splitlines()
    assert "0 of 2 updates skipped as non-finite (loss or gradient norm)" in printed


# --- a prompt too long ------------------------------------------------------------------------------------------

def test_a_huge_question_fails_before_any_model(toy_world, tmp_path, no_models):
    rows = (toy_world / "data/annotations/training_6k.jsonl").read_text().splitlines()
    rows[3] = json.dumps(dict(json.loads(rows[3]), question="wash the red cup " * 300_000))  # 5 MB
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    # before: no bound; the 5 MB question reached the model and tried to allocate ~1 TB
    with pytest.raises(DataError, match=r"train\.jsonl:4: question: the prompt is over \d+ tokens .* more than "
                                        r"--max_prompt_length 16384"):
        grpo_care.main(args(toy_world, tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl")))
