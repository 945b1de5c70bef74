"""The consistency judge of evaluate.py: does a response's reasoning support its answer?

Two protocols, each one prompt (PROMPTS, written into results.json) and one verdict per sample:
* supports (the default, the paper's: "GPT-4.1 ... assess whether the reasoning sufficiently supports the
  answer"): the judge reads the question, the options, the reasoning and the answer and says yes or no;
  consistent = yes.
* picks: the answer hidden, the judge picks the option the reasoning supports; consistent = pick == answer.
Two back-ends, the same prompts:
* local (`--judge_model PATH`, default the evaluated model): one forward pass, the reply is the argmax of
  the next-token logits over the replies' first tokens (Yes/No, A-D): deterministic, never malformed.
* API (`--judge_api_base URL --judge_model NAME`, key from OPENAI_API_KEY): any OpenAI-compatible
  chat-completions endpoint (GPT-4.1, a vLLM/SGLang server), one request per sample at temperature 0.
  Replies are cached in OUTPUT_DIR/judge_cache.jsonl by (model name, prompt): a resumed or repeated
  evaluation asks only what it has no answer for. Timeouts, connection errors and 408/409/429/5xx are
  retried by the openai client (`--judge_retries`, its backoff); a sample still without a yes/no (A-D)
  reply is unjudged: counted in `n_unjudged` with its reason, never as consistent, and asked again next run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from data import LETTERS
from config import ConfigError

PROTOCOLS = ("supports", "picks")
PROMPTS = {  # the one place the judge's instructions live
    "supports": "Question: {question}\nOptions:\n{options}\nReasoning: {reasoning}\nAnswer: {answer}\n\n"
                "Does the reasoning sufficiently support the answer? Answer with yes or no.",
    "picks": "Question: {question}\nOptions:\n{options}\nReasoning: {reasoning}\n\n"
             "Which option does this reasoning support? Answer with a single letter.",
}
REPLIES = {"supports": ("Yes", "No"), "picks": tuple(LETTERS)}  # what the local judge chooses between
_VERDICT = {"supports": re.compile(r"\W*(yes|no)\b", re.IGNORECASE), "picks": re.compile(r"\W*([A-D])\b")}


def check_judge_flags(a) -> None:
    """ConfigError naming the flag for a judge setting that cannot work; before any model is loaded."""
    url, judge_flags = a.judge_api_base, {f: getattr(a, f[2:]) for f in ("--judge_model", "--judge_api_base",
                                          "--judge_protocol", "--judge_timeout", "--judge_retries")}
    for flag, value in judge_flags.items():
        if a.benchmark and value is not None:
            raise ConfigError(f"{flag} {value}: the general benchmarks are not judged; drop it or --benchmark")
    for flag in ("--judge_timeout", "--judge_retries"):
        if judge_flags[flag] is not None and url is None:
            raise ConfigError(f"{flag} {judge_flags[flag]}: applies to an API judge only; add --judge_api_base URL")
    if a.judge_timeout is not None and not a.judge_timeout > 0:
        raise ConfigError(f"--judge_timeout {a.judge_timeout}: must be > 0 (seconds)")
    if a.judge_retries is not None and a.judge_retries < 0:
        raise ConfigError(f"--judge_retries {a.judge_retries}: must be an integer >= 0")
    if url is not None and not re.match(r"https?://", url):
        raise ConfigError(f"--judge_api_base {url}: must be an http:// or https:// URL")
    if url is not None and not a.judge_model:
        raise ConfigError(f"--judge_api_base {url}: needs --judge_model NAME, the endpoint's model (e.g. gpt-4.1)")
    if url is not None and not os.environ.get("OPENAI_API_KEY"):
        raise ConfigError(f"--judge_api_base {url}: set OPENAI_API_KEY (any value for a server that checks none)")


def judge_prompt(protocol: str, question: str, options: list[str], reasoning: str, answer: str) -> str:
    opts = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))
    return PROMPTS[protocol].format(question=question, options=opts, reasoning=reasoning, answer=answer)


def verdict(protocol: str, reply: str | None, answer: str) -> tuple[bool | None, str | None]:
    """(consistent, the pick for `picks`) from a reply; consistent None when the reply is malformed."""
    m = _VERDICT[protocol].match(reply or "")
    if m is None:
        return None, None
    if protocol == "supports":
        return m.group(1).lower() == "yes", None
    return m.group(1) == answer, m.group(1)


def local_judge(model, processor, protocol: str, batch_size: int = 8):
    """judge(prompts) -> [(reply, None)]: the argmax of the next-token logits over REPLIES' first tokens,
    after a text-only chat prompt. Left padding is masked, so a reply does not depend on the batch."""
    tok = getattr(processor, "tokenizer", processor)
    first = [tok.encode(r, add_special_tokens=False)[0] for r in REPLIES[protocol]]
    assert len(set(first)) == len(first), f"judge tokenizer starts two replies alike: {REPLIES[protocol]}"

    def judge(prompts: list[str]) -> list[tuple[str | None, str | None]]:
        replies = []
        for s in range(0, len(prompts), batch_size):
            texts = [processor.apply_chat_template([dict(role="user", content=p)], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts[s:s + batch_size]]
            tok.padding_side = "left"  # the last position is every row's next token
            enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                logits = model(**enc, logits_to_keep=1).logits[:, -1, first]  # (b, n_replies)
            replies += [(REPLIES[protocol][j], None) for j in logits.argmax(-1).tolist()]
        return replies

    return judge


def api_judge(api_base: str, model: str, protocol: str, cache_path: Path, timeout: float = 60.0, retries: int = 3,
              concurrency: int = 8):
    """judge(prompts) -> [(reply, None) or (None, reason)] from an OpenAI-compatible endpoint, one request per
    prompt not yet answered in `cache_path` (read once here; each new answer appended as it arrives)."""
    import openai  # only this back-end needs it

    client = openai.OpenAI(base_url=api_base, api_key=os.environ["OPENAI_API_KEY"], timeout=timeout,
                           max_retries=retries)
    cache, lock = read_cache(cache_path), threading.Lock()
    key = lambda prompt: hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()  # noqa: E731

    def ask(prompt: str) -> tuple[str | None, str | None]:
        if key(prompt) in cache:
            return cache[key(prompt)], None
        try:
            reply = client.chat.completions.create(model=model, temperature=0,
                                                   messages=[dict(role="user", content=prompt)])
            text = reply.choices[0].message.content
        except openai.APITimeoutError:
            return None, "timeout"
        except openai.APIStatusError as e:
            return None, f"HTTP {e.status_code}"
        except openai.APIConnectionError:
            return None, "connection error"
        except (openai.APIResponseValidationError, AttributeError, IndexError, TypeError, ValueError):
            return None, "malformed reply"
        if not isinstance(text, str) or not _VERDICT[protocol].match(text):  # not cached: asked again next run
            return None, "malformed reply"
        with lock:  # one line per answer, appended at once: an interruption loses at most the line being written
            cache[key(prompt)] = text
            with open(cache_path, "a") as f:
                f.write(json.dumps(dict(key=key(prompt), model=model, reply=text)) + "\n")
        return text, None

    def judge(prompts: list[str]) -> list[tuple[str | None, str | None]]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(ask, prompts))

    return judge


def read_cache(path: Path) -> dict[str, str]:
    """key -> reply from judge_cache.jsonl; a line cut by an interruption is dropped."""
    cache = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            cache[row["key"]] = row["reply"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return cache


def judge_records(records: list[dict], examples: list[dict], judge, protocol: str) -> None:
    """Sets `judge_consistent` (True/False, None: not judged), `judge_pick` (picks), `judge_reply`,
    `judge_error` and `judge_protocol` on every record with reasoning and an answer letter."""
    todo = [i for i, r in enumerate(records) if r.get("reasoning") and r.get("answer")]
    prompts = [judge_prompt(protocol, examples[i]["question"], examples[i]["options"], records[i]["reasoning"],
                            records[i]["answer"]) for i in todo]
    replies = judge(prompts) if prompts else []
    assert len(replies) == len(todo), f"judge returned {len(replies)} replies for {len(todo)} prompts"
    for i, (reply, error) in zip(todo, replies):
        consistent, pick = verdict(protocol, reply, records[i]["answer"])
        error = error or (None if consistent is not None else "malformed reply")
        records[i].update(judge_consistent=consistent, judge_pick=pick, judge_reply=reply, judge_error=error,
                          judge_protocol=protocol)
