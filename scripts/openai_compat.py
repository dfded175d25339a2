#!/usr/bin/env python3
"""Checks that the official `openai` Python package works, unchanged, against a running tandem gateway.

Usage: scripts/openai_compat.py BASE_URL   (e.g. http://127.0.0.1:8000/v1; `/v1` is appended when missing)

Prints one `PASS:`/`FAIL:` line per check and, last, `openai_compat.py: N passed, M failed`; exits 1 when any check
fails. scripts/openai_compat.sh starts a server and runs this; CI runs that.
"""

import sys
import traceback

import openai
from openai import OpenAI

MODEL = "qwen3"
FEDERER = "Explain why Roger Federer is considered one of the greatest tennis players of all time"
# A debug build on two CPU cores decodes slowly; a request must still never hang CI forever.
TIMEOUT_S = 300.0

passed = 0
failed = 0


def check(name, ok, detail=""):
    """Records one check; `detail` says what was seen when it failed."""
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS: {name}", flush=True)
    else:
        failed += 1
        print(f"FAIL: {name}" + (f" -- {detail}" if detail else ""), flush=True)
    return ok


def group(name):
    """Runs a group of checks; an exception inside counts as one failed check (with its traceback)."""

    def wrap(body):
        try:
            body()
        except Exception as error:  # noqa: BLE001 - any exception is a failure to report, not to hide
            check(f"{name}: ran without an exception", False, f"{type(error).__name__}: {error}")
            traceback.print_exc(file=sys.stdout)
        return body

    return wrap


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    base_url = sys.argv[1].rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    print(f"openai_compat.py: openai {openai.__version__} against {base_url}", flush=True)
    # No retries anywhere: a failure must show, not be retried away.
    client = OpenAI(base_url=base_url, api_key="unused").with_options(max_retries=0, timeout=TIMEOUT_S)
    check("client: max_retries is 0", client.max_retries == 0, f"max_retries={client.max_retries}")

    @group("models")
    def _models():
        ids = [model.id for model in client.models.list()]
        check("models.list() contains qwen3", MODEL in ids, f"ids={ids}")

    greedy = {}

    @group("chat")
    def _chat():
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": FEDERER}],
            max_tokens=30,
            temperature=0,
        )
        greedy["chat"] = response.choices[0].message.content
        check("chat: object == 'chat.completion'", response.object == "chat.completion", f"object={response.object!r}")
        check("chat: id starts with 'chatcmpl-'", response.id.startswith("chatcmpl-"), f"id={response.id!r}")
        check("chat: usage.prompt_tokens == 25", response.usage.prompt_tokens == 25, f"usage={response.usage}")
        check("chat: usage.completion_tokens == 30", response.usage.completion_tokens == 30, f"usage={response.usage}")
        check(
            "chat: usage.total_tokens == prompt + completion",
            response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens,
            f"usage={response.usage}",
        )
        check(
            "chat: one choice, finish_reason == 'length'",
            len(response.choices) == 1 and response.choices[0].finish_reason == "length",
            f"choices={response.choices}",
        )
        message = response.choices[0].message
        check(
            "chat: message role 'assistant', content a non-empty string",
            message.role == "assistant" and isinstance(message.content, str) and message.content != "",
            f"message={message}",
        )

    @group("chat stream")
    def _chat_stream():
        max_tokens = 30
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": FEDERER}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        check("chat stream: at least 3 chunks", len(chunks) >= 3, f"{len(chunks)} chunks")
        if not chunks:
            return
        check(
            "chat stream: every chunk has object 'chat.completion.chunk' and the same chatcmpl- id",
            all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
            and chunks[0].id.startswith("chatcmpl-"),
            f"objects={sorted({c.object for c in chunks})}, ids={sorted({c.id for c in chunks})}",
        )
        first = chunks[0]
        check(
            "chat stream: first chunk has delta.role == 'assistant'",
            bool(first.choices) and first.choices[0].delta.role == "assistant",
            f"first={first}",
        )
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check("chat stream: exactly one chunk has a finish_reason", len(finishes) == 1, f"finish_reasons={finishes}")
        check("chat stream: the finish_reason is 'length'", finishes == ["length"], f"finish_reasons={finishes}")
        last = chunks[-1]
        check(
            "chat stream: last chunk has usage and empty choices",
            last.usage is not None and last.choices == [],
            f"last={last}",
        )
        check(
            f"chat stream: last chunk usage.completion_tokens == max_tokens ({max_tokens})",
            last.usage is not None and last.usage.completion_tokens == max_tokens,
            f"usage={last.usage}",
        )
        check(
            "chat stream: only the last chunk carries usage",
            all(c.usage is None for c in chunks[:-1]),
            f"usages={[c.usage for c in chunks[:-1] if c.usage is not None]}",
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = greedy.get("chat")
        check(
            "chat stream: concatenated content == non-streamed content (temperature=0)",
            expected is not None and text == expected,
            f"streamed={text!r}, whole={expected!r}",
        )

    @group("chat logprobs")
    def _chat_logprobs():
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        logprobs = response.choices[0].logprobs
        content = logprobs.content if logprobs is not None else None
        tokens = response.usage.completion_tokens
        check(
            "chat logprobs: logprobs.content has one entry per completion token",
            content is not None and len(content) == tokens,
            f"entries={None if content is None else len(content)}, completion_tokens={tokens}",
        )
        content = content or []
        check(
            "chat logprobs: each entry has 3 top_logprobs",
            all(len(entry.top_logprobs) == 3 for entry in content),
            f"counts={[len(entry.top_logprobs) for entry in content]}",
        )
        check(
            "chat logprobs: each logprob <= 0, and the greedy token is the top alternative",
            all(
                entry.logprob <= 0
                and all(top.logprob <= 0 for top in entry.top_logprobs)
                and entry.top_logprobs[0].token == entry.token
                for entry in content
            ),
            f"content={content}",
        )
        # Bytes, not token strings: a token may hold part of a character.
        joined = bytes(b for entry in content for b in (entry.bytes or [])).decode("utf-8", errors="replace")
        check(
            "chat logprobs: the tokens' bytes join to the content",
            joined == response.choices[0].message.content,
            f"joined={joined!r}, content={response.choices[0].message.content!r}",
        )

    @group("completions")
    def _completions():
        response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
        greedy["completion"] = response.choices[0].text
        check(
            "completions: object == 'text_completion'",
            response.object == "text_completion",
            f"object={response.object!r}",
        )
        check("completions: id starts with 'cmpl-'", response.id.startswith("cmpl-"), f"id={response.id!r}")
        check(
            "completions: usage.completion_tokens == 5",
            response.usage is not None and response.usage.completion_tokens == 5,
            f"usage={response.usage}",
        )
        check(
            "completions: usage.prompt_tokens == 1 ('Hello' is one token)",
            response.usage is not None and response.usage.prompt_tokens == 1,
            f"usage={response.usage}",
        )
        check(
            "completions: finish_reason == 'length'",
            response.choices[0].finish_reason == "length",
            f"choices={response.choices}",
        )
        by_ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=5)
        check(
            "completions: prompt=[1,2,3] (token ids) gives text_completion with prompt_tokens == 3",
            by_ids.object == "text_completion"
            and by_ids.usage is not None
            and by_ids.usage.prompt_tokens == 3
            and by_ids.usage.completion_tokens == 5,
            f"response={by_ids}",
        )

    @group("completions stream")
    def _completions_stream():
        stream = client.completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        check(
            "completions stream: every chunk is a text_completion with the same cmpl- id",
            bool(chunks)
            and all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
            and chunks[0].id.startswith("cmpl-"),
            f"objects={sorted({c.object for c in chunks})}, ids={sorted({c.id for c in chunks})}",
        )
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check(
            "completions stream: exactly one chunk has a finish_reason, 'length'",
            finishes == ["length"],
            f"finish_reasons={finishes}",
        )
        last = chunks[-1] if chunks else None
        check(
            "completions stream: last chunk has usage (completion_tokens == 5) and empty choices",
            last is not None and last.usage is not None and last.usage.completion_tokens == 5 and last.choices == [],
            f"last={last}",
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = greedy.get("completion")
        check(
            "completions stream: concatenated text == non-streamed text (temperature=0)",
            expected is not None and text == expected,
            f"streamed={text!r}, whole={expected!r}",
        )

    @group("errors")
    def _errors():
        try:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
            )
            check("errors: unknown model raises openai.NotFoundError (404)", False, "no exception raised")
        except openai.NotFoundError as error:
            check(
                "errors: unknown model raises openai.NotFoundError (404)",
                error.status_code == 404,
                f"status={error.status_code}",
            )
        except openai.APIError as error:
            check(
                "errors: unknown model raises openai.NotFoundError (404)",
                False,
                f"raised {type(error).__name__} (status {getattr(error, 'status_code', None)}): {error}",
            )
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
            check("errors: max_tokens=-1 raises openai.BadRequestError (400)", False, "no exception raised")
        except openai.BadRequestError as error:
            check(
                "errors: max_tokens=-1 raises openai.BadRequestError (400)",
                error.status_code == 400,
                f"status={error.status_code}",
            )
            body = error.body if isinstance(error.body, dict) else {}
            check(
                "errors: the 400's error body names param 'max_tokens'",
                body.get("param") == "max_tokens" and body.get("type") == "invalid_request_error",
                f"body={error.body}",
            )
        except openai.APIError as error:
            check(
                "errors: max_tokens=-1 raises openai.BadRequestError (400)",
                False,
                f"raised {type(error).__name__} (status {getattr(error, 'status_code', None)}): {error}",
            )
        try:
            client.completions.create(model="no-such-model", prompt="Hello", max_tokens=1)
            check("errors: completions with an unknown model raise openai.NotFoundError", False, "no exception raised")
        except openai.NotFoundError as error:
            check(
                "errors: completions with an unknown model raise openai.NotFoundError",
                error.status_code == 404,
                f"status={error.status_code}",
            )
        except openai.APIError as error:
            check(
                "errors: completions with an unknown model raise openai.NotFoundError",
                False,
                f"raised {type(error).__name__} (status {getattr(error, 'status_code', None)}): {error}",
            )

    @group("seed and ignore_eos")
    def _seed():
        def ask(temperature):
            return client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=12,
                temperature=temperature,
                seed=1234,
                extra_body={"ignore_eos": True},
            )

        first, second = ask(0), ask(0)
        check(
            "seed/ignore_eos: accepted, ignore_eos decodes all max_tokens (12)",
            first.usage.completion_tokens == 12 and first.choices[0].finish_reason == "length",
            f"usage={first.usage}, finish_reason={first.choices[0].finish_reason!r}",
        )
        check(
            "seed: two greedy requests with the same seed give the same text",
            first.choices[0].message.content == second.choices[0].message.content,
            f"first={first.choices[0].message.content!r}, second={second.choices[0].message.content!r}",
        )
        sampled_first, sampled_second = ask(1.0), ask(1.0)
        check(
            "seed: two sampled requests (temperature=1) with the same seed give the same text",
            sampled_first.choices[0].message.content == sampled_second.choices[0].message.content,
            f"first={sampled_first.choices[0].message.content!r}, "
            f"second={sampled_second.choices[0].message.content!r}",
        )

    # openai_compat.sh turns this into CI's `openai compat: N passed, M failed` line (printed once, last).
    print(f"openai_compat.py: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
