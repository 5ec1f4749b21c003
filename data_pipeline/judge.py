"""LLM relatedness judge (paper appendix C.1, Fig. 8) through the `openai` client, with a content-addressed cache.

The paper removed specificity prompts that GPT-4 judged *related* to the edit, with two prompts (Fig. 8): one asks
whether a CounterFact **neighbourhood** prompt's subject is related to the edited subject, the other whether a
WikiData **relation** prompt asks about a relation related to the edited one. A related prompt is not a fair
specificity test: the edit may legitimately change its answer.

The exact wording of Fig. 8 is not in our reference material (reference-spec, data README); the two templates below
are our own faithful versions of its two questions. They are part of the cache key (the key is the rendered prompt
text), so changing a word re-asks everything, and `PROMPTS_ID` (a hash of both templates) is written into the card.

Protocol, per prompt: one chat completion, ``[{"role": "user", "content": rendered prompt}]``, temperature 0,
``max_tokens`` small. The answer is parsed by `parse_answer`: exactly "related" or "unrelated" (case, quotes,
surrounding punctuation and an "Answer:" lead-in ignored); anything else is **unparseable**, recorded verbatim
and counted, never guessed.

Cache (`JudgmentCache`): an append-only JSONL file (`basis.io.AppendLog`: one fsynced line per answer, torn
tail dropped on open), one row per key = sha256(canonical JSON of {model, prompt}). It stores the model, prompt
text, raw answer, parsed label and token usage, never the API key. With every needed key cached, a run makes no
request and needs neither network nor key, so a rerun is offline and byte-identical. ``mode="replay"`` refuses to
ask anything: a miss raises `JudgeError` naming how many and the first one.

Transport: ``openai.OpenAI(base_url=…, api_key=$ENV, max_retries=0, timeout=…)``; any OpenAI-compatible server
works. Retries are ours (testable): 429, 5xx, 408/409, timeouts and connection errors back off exponentially
(``backoff_base · 2^attempt``, capped, with jitter; a Retry-After header is honoured up to the cap). Other HTTP
errors (401, 400, 404 …) stop the run at once. Concurrency is bounded by a thread pool of ``concurrency`` workers;
answers already received are cached before any error propagates.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from basis.errors import UserError
from basis.io import AppendLog, dumps_line, parse_jsonl

from .schema import Case, Probe

LABELS = ("related", "unrelated", "unparseable")

NEIGHBOR_PROMPT = """You are checking test cases of a knowledge-editing benchmark.
A language model is edited so that it states a new fact about one subject. A "neighbourhood" test asks about a \
different subject and must keep its original answer after the edit. Such a test is invalid when its subject is \
related to the edited subject: the same entity, another name for it, a part, member or product of it, or an entity \
whose answer could reasonably change because of the edit.

Edited subject: {subject}
Edited fact (new): {edit_prompt} {target_new}
Original fact: {edit_prompt} {target_true}
Neighbourhood test: {probe_prompt} {probe_target}

Is the subject of the neighbourhood test related to the edited subject?
Answer with exactly one word: related or unrelated."""

RELATION_PROMPT = """You are checking test cases of a knowledge-editing benchmark.
A language model is edited so that it states a new fact about a subject. A "relation" test asks about the same \
subject but a different relation and must keep its original answer after the edit. Such a test is invalid when its \
relation is related to the edited relation: the same relation in other words, or a relation whose true answer is \
implied by, or would change together with, the edited fact.

Subject: {subject}
Edited fact (new): {edit_prompt} {target_new}
Original fact: {edit_prompt} {target_true}
Relation test: {probe_prompt} {probe_target}

Is the relation asked by the relation test related to the edited relation?
Answer with exactly one word: related or unrelated."""

TEMPLATES = {"neighbor": NEIGHBOR_PROMPT, "relation": RELATION_PROMPT}
PROMPTS_ID = hashlib.sha256(dumps_line(TEMPLATES).encode("utf-8")).hexdigest()[:12]

_ANSWER = re.compile(r"^(?:answer\s*[:\-]\s*)?(related|unrelated)$")


class JudgeError(UserError, RuntimeError):
    """The judge cannot finish: a cache miss in replay mode, a non-retryable API error, or retries exhausted."""


@dataclass
class JudgeConfig:
    """Judge settings (params.yaml `data_raw.judge`); the API key is never a setting: only its env variable name."""
    model: str = "gpt-4-0613"
    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL or api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 60.0
    max_tokens: int = 5
    temperature: float = 0.0
    price_in_per_1k: float = 0.03  # USD per 1k prompt tokens (GPT-4-0613 list price); for the estimate only
    price_out_per_1k: float = 0.06
    cache: str = "data/judge/judgments.jsonl"
    unparseable: str = "keep"  # keep | drop the prompt when the answer cannot be parsed

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "JudgeConfig":
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown judge setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def render(kind: str, case: Case, probe: Probe) -> str:
    """The judge prompt for one probe of `case` (kind 'neighbor' or 'relation')."""
    return TEMPLATES[kind].format(subject=case.subject, edit_prompt=case.prompt, target_new=case.target_new,
                                  target_true=case.target_true, probe_prompt=probe.prompt, probe_target=probe.target)


def cache_key(model: str, prompt: str) -> str:
    """Content address of one judgment: sha256 of the canonical JSON of {model, prompt}."""
    return hashlib.sha256(dumps_line({"model": model, "prompt": prompt}).encode("utf-8")).hexdigest()


def parse_answer(text: Any) -> str:
    """'related' | 'unrelated' | 'unparseable' (see module docstring); no guessing from partial matches."""
    if not isinstance(text, str):
        return "unparseable"
    t = text.strip().lower()
    t = t.strip(" \t\n\"'`*.!,;")
    return m.group(1) if (m := _ANSWER.match(t)) else "unparseable"


def estimate_tokens(text: str) -> int:
    """Rough prompt-token count: ceil(characters / 4) + 7 for the chat framing (no tokenizer dependency)."""
    return math.ceil(len(text) / 4) + 7


def public_endpoint(base_url: str | None) -> str:
    """base_url without credentials, query or fragment (safe to write into a card)."""
    if not base_url:
        return "openai default"
    p = urlsplit(base_url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


class _EmptyAnswer(Exception):
    """The endpoint answered without a model answer (``choices: []`` or ``content: null``): retried like a server
    error and never cached, so a healthy rerun asks again."""


class JudgmentCache:
    """Content-addressed, append-only judgment store (thread-safe; kill-safe through AppendLog)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        """`readonly`: read what is there (torn tail ignored), create and change nothing (dry runs)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self.rows: dict[str, dict] = {}
        self._log = None if readonly else AppendLog(self.path)
        for row in (self._log.rows if self._log else self._read_only()):
            # only real model answers count (a row without a text answer, e.g. written by an older version from an
            # empty response, is ignored, so the prompt is asked again)
            if isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("answer"), str):
                self.rows.setdefault(row["key"], row)

    def _read_only(self) -> list[dict]:
        """The rows as `AppendLog` reads them (a bad complete line is an error), without changing the file."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        return parse_jsonl(raw[: raw.rfind(b"\n") + 1], str(self.path),
                           "; fix or remove that line (a merge conflict?), nothing was changed")

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        if not isinstance(row.get("answer"), str):
            raise ValueError(f"judgment cache {self.path}: only model answers (text) are cached, got {row.get('answer')!r}")
        with self._lock:
            if row["key"] in self.rows:
                return
            if self._log is None:
                raise JudgeError(f"judgment cache {self.path} was opened read-only")
            self._log.append(row)
            self.rows[row["key"]] = row

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> "JudgmentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class RunStats:
    to_ask: int = 0
    asked: int = 0
    cache_hits: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    labels: dict[str, int] = field(default_factory=lambda: {k: 0 for k in LABELS})

    def as_dict(self) -> dict:
        return asdict(self)


def _unique(prompts: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for p in prompts:
        seen.setdefault(p, None)
    return list(seen)


class Judge:
    """Ask (or replay) relatedness judgments for rendered prompts; see the module docstring for the protocol."""

    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache, *, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        self.cfg = cfg
        self.cache = cache
        self._client = client
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._stats_lock = threading.Lock()

    # -------------------------------------------------------------------------------- planning / estimate
    def missing(self, prompts: Iterable[str]) -> list[str]:
        return [p for p in _unique(prompts) if self.cache.get(cache_key(self.cfg.model, p)) is None]

    def estimate(self, prompts: Iterable[str]) -> dict:
        """What a run would do: prompt counts, cache hits, estimated tokens and cost of the missing ones."""
        prompts = list(prompts)
        uniq = _unique(prompts)
        todo = self.missing(uniq)
        tin = sum(estimate_tokens(p) for p in todo)
        tout = len(todo) * max(1, min(self.cfg.max_tokens, 2))  # "related"/"unrelated" is 1–2 tokens
        return {"model": self.cfg.model, "endpoint": public_endpoint(self.cfg.base_url), "prompts": len(prompts),
                "unique_prompts": len(uniq), "cached": len(uniq) - len(todo), "to_ask": len(todo),
                "est_prompt_tokens": tin, "est_completion_tokens": tout,
                "est_cost_usd": round(tin / 1000 * self.cfg.price_in_per_1k + tout / 1000 * self.cfg.price_out_per_1k,
                                      4),
                "price_per_1k": {"prompt": self.cfg.price_in_per_1k, "completion": self.cfg.price_out_per_1k}}

    # -------------------------------------------------------------------------------- transport
    def _api_key(self) -> str:
        key = os.environ.get(self.cfg.api_key_env, "")
        if not key:
            raise JudgeError(f"the judge needs an API key in the environment variable {self.cfg.api_key_env} "
                             "(for a local OpenAI-compatible server without auth, set it to any value); "
                             "or run with the judgment cache complete (--replay) to stay offline")
        return key

    def _get_client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.cfg.base_url, api_key=self._api_key(), max_retries=0,
                                         timeout=self.cfg.timeout)
        return self._client

    def _scrub(self, msg: str) -> str:
        key = os.environ.get(self.cfg.api_key_env, "")
        return msg.replace(key, "***") if key else msg

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        d = min(self.cfg.backoff_max, self.cfg.backoff_base * (2 ** attempt))
        d *= 0.5 + 0.5 * self._rng.random()  # jitter: concurrent workers do not retry in lockstep
        if retry_after:
            try:
                d = max(d, min(self.cfg.backoff_max, float(retry_after)))
            except ValueError:
                pass
        return d

    def _ask_one(self, prompt: str, stats: RunStats) -> dict:
        import openai

        client = self._get_client()
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                resp = client.chat.completions.create(
                    model=self.cfg.model, messages=[{"role": "user", "content": prompt}],
                    temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
                answer = resp.choices[0].message.content if resp.choices else None
                if not isinstance(answer, str):  # no choices, or null content: not an answer, never cached
                    raise _EmptyAnswer("an answer with no choices" if not resp.choices else "an answer with no text")
                usage = getattr(resp, "usage", None)
                pt = int(getattr(usage, "prompt_tokens", 0) or 0)
                ct = int(getattr(usage, "completion_tokens", 0) or 0)
                with self._stats_lock:
                    stats.asked += 1
                    stats.prompt_tokens += pt
                    stats.completion_tokens += ct
                return {"key": cache_key(self.cfg.model, prompt), "model": self.cfg.model, "prompt": prompt,
                        "endpoint": public_endpoint(self.cfg.base_url), "answer": answer, "label": parse_answer(answer),
                        "usage": {"prompt_tokens": pt, "completion_tokens": ct}}
            except _EmptyAnswer as exc:
                kind, why = "server_errors", str(exc)
            except openai.APITimeoutError:
                kind, why = "timeouts", f"timed out after {self.cfg.timeout:g} s"
            except openai.APIConnectionError as exc:
                kind, why = "server_errors", f"connection error ({exc.__class__.__name__})"
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status == 429:
                    kind = "rate_limited"
                elif status >= 500 or status in (408, 409):
                    kind = "server_errors"
                else:
                    raise JudgeError(self._scrub(
                        f"judge request failed with HTTP {status} from {public_endpoint(self.cfg.base_url)} "
                        f"(model {self.cfg.model}): {exc.message}; not retried — check the model name, base_url "
                        f"and the key in {self.cfg.api_key_env}")) from None
                why = f"HTTP {status}"
                retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
            with self._stats_lock:
                setattr(stats, kind, getattr(stats, kind) + 1)
            if attempt == self.cfg.max_retries:
                raise JudgeError(f"judge request still failing after {self.cfg.max_retries} retries (last: {why}) "
                                 f"at {public_endpoint(self.cfg.base_url)}; answers received so far are cached — "
                                 "rerun to continue, or lower judge.concurrency")
            with self._stats_lock:
                stats.retries += 1
            self._sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------------------- run
    def run(self, prompts: Iterable[str], *, mode: str = "live", progress: bool = False) -> dict[str, str]:
        """Judge every prompt; returns {prompt: label}. Modes: live (ask what is missing) or replay (cache only)."""
        if mode not in ("live", "replay"):
            raise ValueError(f"mode must be live or replay, got {mode!r}")
        t0 = time.perf_counter()
        uniq = _unique(prompts)
        todo = self.missing(uniq)
        stats = RunStats(to_ask=len(todo), cache_hits=len(uniq) - len(todo))
        self.last_stats = stats
        if todo and mode == "replay":
            first = todo[0].splitlines()
            probe = next((ln for ln in first if ln.startswith(("Neighbourhood test:", "Relation test:"))), first[0])
            raise JudgeError(f"replay mode: {len(todo)} of {len(uniq)} judge prompts are not in the cache "
                             f"{self.cache.path} for model {self.cfg.model} (first: {probe!r}); run without "
                             "--replay against an endpoint to fill the cache, or restore it (dvc pull)")
        if todo:
            self._get_client()  # fail fast on a missing key, before any thread starts
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(todo), desc=f"judge {self.cfg.model}", unit="prompt")
            pool = ThreadPoolExecutor(max_workers=max(1, int(self.cfg.concurrency)))

            def work(p: str) -> None:  # each answer is on disk (fsynced) before its worker takes the next prompt
                self.cache.put(self._ask_one(p, stats))

            try:
                pending = {pool.submit(work, p) for p in todo}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    if bar:
                        bar.update(sum(1 for f in done if f.exception() is None))
                    errors = [f.exception() for f in done if f.exception() is not None]
                    if errors:
                        for f in pending:
                            f.cancel()
                        wait(pending)  # requests already in flight finish and are cached
                        raise errors[0]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                if bar:
                    bar.close()
        out = {}
        for p in uniq:
            label = parse_answer(self.cache.get(cache_key(self.cfg.model, p))["answer"])
            stats.labels[label] += 1
            out[p] = label
        stats.wall_s = round(time.perf_counter() - t0, 3)
        return out
