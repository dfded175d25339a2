#!/usr/bin/env python3
"""Sends tandem what `vllm bench serve --backend openai-chat` sends, and reads the answer the way its client does.

vLLM's request function for that backend (vllm/benchmarks/lib/endpoint_request_func.py,
async_request_openai_chat_completions) posts `messages` with the prompt as a list of text parts,
`max_completion_tokens`, `stream: true`, `stream_options.include_usage: true` and, with --ignore-eos, `ignore_eos`;
it splits the stream on blank lines, drops `data: `, skips `:` comments, takes the first event with a non-empty
`choices` as the first token (TTFT), reads `choices[0]["delta"].get("content")`, and takes `completion_tokens` and
`prompt_tokens` from the event with `usage`. A request counts as failed if no event carried choices.

This script does the same with the standard library only (no vLLM install) and checks what that client relies on:
  python3 bench/vllm_openai_chat_check.py --base-url http://127.0.0.1:8000 --num-prompts 8 --output-len 16
Exit status 0 when every request would count as successful with exactly --output-len tokens.
"""

import argparse
import http.client
import json
import sys
import time
import urllib.parse


def one_request(base_url, model, prompt, output_len):
    url = urllib.parse.urlparse(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=120)
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "max_completion_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(payload),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    if response.status != 200:
        return {"ok": False, "error": f"HTTP {response.status}: {response.read()[:300]!r}"}
    buffer = ""
    ttft = None
    itl = []
    last = started
    output_tokens = None
    prompt_tokens = None
    content = ""
    done = False
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        buffer += chunk.decode("utf-8")
        while "\n\n" in buffer:
            message, buffer = buffer.split("\n\n", 1)
            message = message.strip()
            if not message or message.startswith(":"):
                continue
            data = message.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            now = time.perf_counter()
            if event.get("choices"):
                delta_content = event["choices"][0]["delta"].get("content")
                if ttft is None:
                    ttft = now - started
                else:
                    itl.append(now - last)
                last = now
                content += delta_content or ""
            elif event.get("usage"):
                output_tokens = event["usage"].get("completion_tokens")
                prompt_tokens = event["usage"].get("prompt_tokens")
    connection.close()
    if ttft is None:
        return {"ok": False, "error": "no event carried choices (vLLM marks the request failed)"}
    return {
        "ok": done,
        "error": None if done else "no [DONE]",
        "ttft_ms": ttft * 1000,
        "itl_events": len(itl),
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="qwen3")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    failures = 0
    for index in range(args.num_prompts):
        prompt = f"Request {index}: describe the weather on a planet with two suns in detail."
        result = one_request(args.base_url, args.model, prompt, args.output_len)
        print(json.dumps(result))
        if not result["ok"]:
            failures += 1
        elif result["output_tokens"] != args.output_len:
            print(f"  usage.completion_tokens {result['output_tokens']} != {args.output_len}")
            failures += 1
        elif not result["prompt_tokens"]:
            print("  no usage.prompt_tokens")
            failures += 1
    print(f"{args.num_prompts - failures}/{args.num_prompts} requests as vLLM's openai-chat client counts them")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
