"""judge.py: the two protocols' prompts and verdicts, the local back-end, and the API back-end end to end
against an OpenAI-compatible server on 127.0.0.1 (stdlib http.server, answering by rule) with a timeout, a
server error and malformed replies; bad judge flags fail before any model is loaded."""
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import evaluate as ev
import judge
import toy
from data import load_examples
from config import ConfigError, run_cli

OPTIONS = ["cut the red fruit", "cut the blue fruit", "wash the cup", "open the door"]


def _example(id=0, gold="A"):
    return dict(id=id, options=list(OPTIONS), solution=gold, question="q?", domain=None, prompt=f"prompt {id}")


# --- prompts and verdicts ------------------------------------------------------------------------
def test_prompts_show_the_answer_only_under_supports():
    p = judge.judge_prompt("supports", "q?", ["w", "x"], "because", "B")
    assert p == ("Question: q?\nOptions:\nA. w\nB. x\n\nReasoning: because\nAnswer: B\n\n"
                 "Does the reasoning sufficiently support the answer? Answer with yes or no.")
    p = judge.judge_prompt("picks", "q?", ["w", "x"], "because", "B")
    assert "Answer: B" not in p and p.endswith("Which option does this reasoning support? Answer with a single letter.")


@pytest.mark.parametrize("protocol, reply, answer, expected", [
    ("supports", "Yes", "B", (True, None)), ("supports", "no.", "B", (False, None)),
    ("supports", " YES, it does", "B", (True, None)), ("supports", "Yesterday", "B", (None, None)),  # not a word yes
    ("supports", "I think so", "B", (None, None)), ("supports", None, "B", (None, None)),
    ("picks", "B", "B", (True, "B")), ("picks", "(C) wash", "B", (False, "C")),
    ("picks", "b", "B", (None, None)), ("picks", "Both", "B", (None, None)),
])
def test_verdict(protocol, reply, answer, expected):
    assert judge.verdict(protocol, reply, answer) == expected


def test_judge_records_with_a_stub():
    seen = []

    def stub(prompts):  # yes for r1, no for r2, a malformed reply for r6, a timeout for r7
        seen.extend(prompts)
        return [("Yes", None) if "r1" in p else ("No", None) if "r2" in p else ("maybe", None) if "r6" in p
                else (None, "timeout") for p in prompts]

    outputs = ["<think>r1</think> <answer>A</answer>",  # consistent (and correct)
               "<think>r2</think> <answer>B</answer>",  # inconsistent
               "<answer>A</answer>",  # no reasoning: not judged
               "<think>r4</think> no answer",  # no answer: not judged
               "<think> </think><answer>A</answer>",  # empty reasoning: not judged
               "<think>r6</think> <answer>A</answer>",  # malformed reply: unjudged
               "<think>r7</think> <answer>C</answer>"]  # timeout: unjudged
    examples = [_example(id=i) for i in range(7)]
    records = [ev.score(e, "L1", o, 5, toy_world=True) for e, o in zip(examples, outputs)]
    judge.judge_records(records, examples, stub, "supports")
    assert len(seen) == 4 and "Reasoning: r1\nAnswer: A\n" in seen[0] and "Answer: C" in seen[3]
    assert [r.get("judge_consistent") for r in records] == [True, False, None, None, None, None, None]
    assert [r.get("judge_error") for r in records] == [None, None, None, None, None, "malformed reply", "timeout"]
    s = ev.summarize(records)["L1"]
    # strict: outputs 1, 3, 5, 6 right (4/7); 4 answered with reasoning, 2 judged: 1/2 consistent, 1/1 correct
    assert (s["strict"], s["n_judged"], s["n_unjudged"], s["consistency"], s["consistency_correct"]) == \
        (57.14, 2, 2, 50.0, 100.0)
    assert s["judge_protocol"] == "supports" and s["rule_consistency"] == 0.0  # the rule finds no option


@pytest.mark.parametrize("protocol", judge.PROTOCOLS)
def test_local_judge_is_deterministic_and_batch_free(toy_model, protocol):
    model, processor = toy_model
    prompts = [judge.judge_prompt(protocol, "what next?", OPTIONS, r, "B") for r in
               ["I see the red object.", toy.cot_text("blue", "cut the blue fruit"), "Hmm."]]  # lengths differ: padding
    batched = judge.local_judge(model, processor, protocol, batch_size=3)(prompts)
    single = judge.local_judge(model, processor, protocol, batch_size=1)(prompts)
    assert batched == single and len(batched) == 3
    assert all(reply in judge.REPLIES[protocol] and error is None for reply, error in batched)


def test_causal_lm_judge(toy_world, tmp_path):
    """--judge_model may be a text-only causal LM: loaded with AutoModelForCausalLM + AutoTokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(toy_world / "model")  # the toy tokenizer and chat template
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=704, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, proc = ev.load_eval_model(str(tmp_path), torch.device("cpu"))
    assert type(model).__name__ == "Qwen2ForCausalLM" and not hasattr(proc, "tokenizer")
    prompts = [judge.judge_prompt("supports", "q?", OPTIONS, r, "A") for r in ["short", "a much longer reasoning"]]
    replies = judge.local_judge(model, proc, "supports", batch_size=2)(prompts)
    assert replies == judge.local_judge(model, proc, "supports", batch_size=1)(prompts)
    assert all(reply in ("Yes", "No") for reply, _ in replies)


# --- the API back-end, end to end ----------------------------------------------------------------
class RuleJudge(BaseHTTPRequestHandler):
    """/v1/chat/completions by rule: "Yes" when the toy reasoning names the answer's option, else "No". Reasoning
    with SLOW answers late (past the client's timeout), CRASH gets HTTP 500, GARBLE a reply that is no verdict,
    JUNK a body that is not JSON."""
    seen: list = []

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
        self.seen.append(prompt)
        reasoning = re.search(r"Reasoning: (.*)\n", prompt).group(1)
        if "SLOW" in reasoning:
            time.sleep(1.0)
        if "CRASH" in reasoning:
            return self._send(500, b'{"error": {"message": "boom"}}', {"retry-after-ms": "1"})
        if "JUNK" in reasoning:
            return self._send(200, b"<html>not json</html>")
        options = dict(re.findall(r"^([A-D])\. (.*)$", prompt, re.MULTILINE))
        named = ev.toy_rule_pick(reasoning, list(options.values()))
        reply = "I cannot tell." if "GARBLE" in reasoning else "Yes" if named == re.search(
            r"Answer: ([A-D])", prompt).group(1) else "No"
        body = dict(id="x", object="chat.completion", created=0, model="rule",
                    choices=[dict(index=0, finish_reason="stop", message=dict(role="assistant", content=reply))])
        self._send(200, json.dumps(body).encode())

    def _send(self, code, body, headers=None):
        try:
            self.send_response(code)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RuleJudge.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RuleJudge)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_api_judge_end_to_end(toy_world, server, tmp_path, monkeypatch):
    """evaluate.py with --judge_api_base on 6 finished toy L1 samples (predictions.jsonl written by hand, so
    nothing is generated): 2 judged by rule, 4 unjudged (a timeout, a 500, a non-verdict, a non-JSON body);
    the same command again asks only the 4 again."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    data, out = toy_world / "data", tmp_path / "out"
    exs = sorted(load_examples(data / "annotations/validation_L1.jsonl", data), key=ev.id_order)[:6]
    gold = [ex["options"][ord(ex["solution"]) - ord("A")] for ex in exs]
    wrong = [next(L for L in "ABCD" if L != ex["solution"]) for ex in exs]
    outputs = [f"<think>{toy.cot_text('red', gold[0])}</think><answer>{exs[0]['solution']}</answer>",  # Yes
               f"<think>{toy.cot_text('red', gold[1])}</think><answer>{wrong[1]}</answer>",  # No
               *(f"<think>{word}</think><answer>A</answer>" for word in ("SLOW", "CRASH", "GARBLE", "JUNK"))]
    out.mkdir()
    (out / "predictions.jsonl").write_text("".join(json.dumps(ev.score(ex, "L1", o, 9, toy_world=True)) + "\n"
                                                   for ex, o in zip(exs, outputs)))
    args = ["--model_path", str(toy_world / "model"), "--data_root", str(data), "--output_dir", str(out), "--toy",
            "--levels", "L1", "--max_samples", "6", "--judge_api_base", server, "--judge_model", "rule",
            "--judge_timeout", "0.3", "--judge_retries", "1"]
    start = time.time()
    results = ev.main(args)
    assert time.time() - start < 20
    L1 = results["levels"]["L1"]
    assert (L1["n"], L1["n_judged"], L1["n_unjudged"], L1["consistency"], L1["judge_protocol"]) == \
        (6, 2, 4, 50.0, "supports")  # 1 yes of 2 judged; the unjudged never count as consistent
    assert results["judge"] == dict(model="rule", api_base=server, protocol="supports",
                                    prompt=judge.PROMPTS["supports"],
                                    unjudged={"HTTP 500": 1, "malformed reply": 2, "timeout": 1})
    count = lambda word: sum(f"Reasoning: {word}\n" in p for p in RuleJudge.seen)  # noqa: E731
    assert [count(w) for w in ("SLOW", "CRASH", "GARBLE", "JUNK")] == [2, 2, 1, 1]  # retried once: timeout, 500
    assert len(RuleJudge.seen) == 2 + 6
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["judge_consistent"] for r in lines] == [True, False, None, None, None, None]
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 2  # only verdicts are cached

    RuleJudge.seen.clear()
    assert ev.main(args) == results  # the cached two are not asked again
    assert [count(w) for w in ("SLOW", "CRASH", "GARBLE", "JUNK")] == [2, 2, 1, 1] and len(RuleJudge.seen) == 6


@pytest.mark.parametrize("flags, message", [
    (["--judge_api_base", "http://127.0.0.1:9/v1"], "--judge_api_base http://127.0.0.1:9/v1: needs --judge_model"),
    (["--judge_api_base", "127.0.0.1:9", "--judge_model", "m"], "must be an http:// or https:// URL"),
    (["--judge_timeout", "5"], "--judge_timeout 5.0: applies to an API judge only"),
    (["--judge_api_base", "http://h/v1", "--judge_model", "m", "--judge_retries", "-1"], "--judge_retries -1: must be"),
    (["--judge_api_base", "http://h/v1", "--judge_model", "m", "--judge_timeout", "0"],
     "--judge_timeout 0.0: must be > 0"),
    (["--benchmark", "mvbench", "--judge_protocol", "picks"], "--judge_protocol picks: the general benchmarks are not"),
])
def test_bad_judge_flags_fail_before_any_model(flags, message, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setattr(ev, "load_eval_model", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        ev.main(["--model_path", "nowhere", "--data_root", "nowhere", *flags])


def test_missing_api_key(monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(ev, "load_eval_model", lambda *a: pytest.fail("a model was loaded"))
    argv = ["evaluate.py", "--model_path", "nowhere", "--data_root", "x", "--judge_api_base", "http://127.0.0.1:9/v1",
            "--judge_model", "gpt-4.1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        run_cli(ev.main)  # as `python evaluate.py ...` runs it: one line, exit status 2
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: --judge_api_base http://127.0.0.1:9/v1: set OPENAI_API_KEY (any value for a server that checks none)\n")
