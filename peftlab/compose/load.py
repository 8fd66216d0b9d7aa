"""A bounded load test of an OpenAI-compatible server: N client threads send chat requests for a fixed time.

Each client loops over the given models (adapters, the base) in turn, one request at a time, until the time is up;
a request still running then is awaited and counted. The result counts requests, completion tokens and failures,
and gives requests/s and tokens/s over the wall time. Standard library only (urllib), so it measures any server.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Sequence

PROMPTS = ("hello how are you", "what is the answer", "classify the review", "hi")


def chat_request(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None, timeout: float) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    body["temperature"] = 0
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def load_test(
    url: str,
    models: Sequence[str],
    clients: int = 8,
    seconds: float = 3.0,
    max_tokens: int = 16,
    api_key: str | None = None,
    prompts: Sequence[str] = PROMPTS,
    timeout: float = 120.0,
) -> dict:
    """``url`` is the API root (``http://host:port/v1``). Returns {clients, seconds, requests, failures,
    completion_tokens, requests_per_s, tokens_per_s}."""
    counts = {"requests": 0, "failures": 0, "completion_tokens": 0}
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds

    def client(k: int) -> None:
        i = k
        while time.monotonic() < end:
            model, prompt = models[i % len(models)], prompts[i % len(prompts)]
            i += 1
            try:
                reply = chat_request(url, model, prompt, max_tokens, api_key, timeout)
                tokens = int(reply["usage"]["completion_tokens"])
            except (OSError, KeyError, ValueError) as error:  # HTTP errors are OSErrors too
                with lock:
                    counts["failures"] += 1
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                counts["requests"] += 1
                counts["completion_tokens"] += tokens

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {
        "clients": clients,
        "seconds": round(wall, 3),
        **counts,
        "requests_per_s": counts["requests"] / wall,
        "tokens_per_s": counts["completion_tokens"] / wall,
        "first_errors": errors[:3],
    }
