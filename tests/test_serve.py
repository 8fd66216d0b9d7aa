"""peftlab serve: a real server on loopback over the tiny Llama and two LoRA adapters trained here, spoken to through
the real ``openai`` client. Every reply equals what the library's generation gives for that request alone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peftlab  # noqa: E402
from peftlab.bench.assets import build_tiny_llama  # noqa: E402
from peftlab.compose.load import load_test  # noqa: E402
from peftlab.compose.server import BackgroundServer, create_app  # noqa: E402
from peftlab.compose.serving import ServingEngine  # noqa: E402
from peftlab.evaluate.generation import generate  # noqa: E402

from .conftest import CHAT_WORDS  # noqa: E402

KEY = "test-key"
BASE = "tiny-llama"
QUESTIONS = ["hello how are you", "what is the answer", "classify the review", "hi"]
TRAIN = ["--task", "sft", "--max-steps", "8", "--lr", "0.05", "--batch-size", "8", "--max-length", "32", "--r", "4",
         "--eval-generate", "0", "--forgetting-data", "none"]  # fmt: skip


def train_adapter(model_dir, folder, reply: str):
    """A LoRA adapter trained for a few steps to answer every question with ``reply``."""
    from peftlab.cli import main

    folder.mkdir()
    rows = [{"instruction": q, "output": reply} for q in QUESTIONS * 8]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--no-progress", "train", "--model", model_dir, "--data", data, "--out", folder / "run", *TRAIN]
    assert main([str(a) for a in args]) == 0
    return folder / "run" / "adapter"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {
        "fine": train_adapter(tiny_llama_dir, root / "fine", "fine thanks"),
        "yes": train_adapter(tiny_llama_dir, root / "yes", "yes positive review"),
    }


def llama(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    engine = ServingEngine(llama(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir), BASE, max_batch=8)
    engine.window_s = 0.05  # generous, so that the threads of a test surely share a batch
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    with BackgroundServer(create_app(engine, api_key=KEY, tokens_limit=64)) as running:
        running.engine = engine
        yield running


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def alone(tiny_llama_dir, adapter, messages, max_tokens):
    """The reply of the library's generation (as ``peftlab generate``) with only this adapter loaded."""
    model = llama(tiny_llama_dir)
    if adapter is not None:
        peftlab.load_adapter(model, adapter)
    return generate(model, AutoTokenizer.from_pretrained(tiny_llama_dir), [messages], max_tokens)[0]


def ask(client, model, question, max_tokens=12, **kwargs):
    messages = [{"role": "user", "content": question}]
    chat = client.chat.completions
    return chat.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs)


def call(method: str, url: str, body=None, headers=None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request (bytes are sent as they are, anything else as JSON)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_lists_the_base_and_every_adapter(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [BASE, "fine", "yes"]
    assert all(m.object == "model" and m.owned_by == "peftlab" for m in models.data)
    assert client.models.retrieve("fine").id == "fine"


def test_concurrent_requests_to_different_adapters_equal_each_alone(server, client, tiny_llama_dir, adapters):
    jobs = [(m, q) for m in ("fine", "yes", BASE) for q in QUESTIONS[:2]]
    replies = {}
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait()
        replies[job] = ask(client, *job)

    threads = [threading.Thread(target=send, args=(job,)) for job in jobs]
    batches_before = server.engine.stats.batches
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.engine.stats.largest_batch > 1 and server.engine.stats.batches - batches_before < len(jobs)
    texts = {}
    for (model, question), reply in replies.items():
        expected = alone(tiny_llama_dir, adapters.get(model), [{"role": "user", "content": question}], 12)
        assert reply.choices[0].message.content == expected, (model, question)
        assert reply.model == model and reply.object == "chat.completion"
        assert reply.usage.completion_tokens >= 1
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        texts[model] = expected
    assert len(set(texts.values())) == 3  # the adapters really answer differently from each other and the base
    assert texts["fine"].startswith("fine")


def test_the_generate_command_prints_the_same_reply(client, cli, tiny_llama_dir, adapters, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    code, out, err = cli("generate", "--model", tiny_llama_dir, "--adapter", adapters["yes"], "--prompts", prompts,
                         "--max-new-tokens", "12")  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == [ask(client, "yes", q).choices[0].message.content for q in QUESTIONS]


def test_streaming_gives_the_same_text_in_chunks(client):
    reply = ask(client, "yes", "hi")
    whole = reply.choices[0].message.content
    chunks = list(ask(client, "yes", "hi", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reply.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []


def test_the_stream_ends_with_done(server):
    body = {"model": "fine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_take_prompt_text(client, tiny_llama_dir, adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = llama(tiny_llama_dir)
    peftlab.load_adapter(model, adapters["fine"])
    ids = torch.tensor([tokenizer("hello how are you")["input_ids"]])
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :])
    reply = client.completions.create(model="fine", prompt="hello how are you", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.replace("<|im_end|>", "")
    assert reply.usage.prompt_tokens == ids.shape[1]
    two = client.completions.create(model="fine", prompt=["hello how are you", "hi"], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == reply.choices[0].text
    streamed = client.completions.create(model="fine", prompt="hello how are you", max_tokens=6, temperature=0,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_stop_strings_cut_the_reply(client):
    whole = ask(client, "yes", "hi").choices[0].message.content
    word = whole.split()[1]
    cut = ask(client, "yes", "hi", stop=[word])
    assert cut.choices[0].message.content == whole[: whole.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "yes", "hi", stop=word, stream=True))
    assert streamed == cut.choices[0].message.content


def test_sampling_with_a_seed_repeats(client):
    def sample(seed):
        messages = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model=BASE, messages=messages, max_tokens=10, temperature=1.5, seed=seed)
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_adapters_load_and_unload_while_serving(server, client, tiny_llama_dir, adapters, tmp_path):
    headers = {"Authorization": f"Bearer {KEY}"}
    again = {"name": "again", "path": str(adapters["fine"])}
    status, loaded = call("POST", server.url + "/v1/adapters", again, headers)
    assert status == 200 and loaded["id"] == "again"
    assert "again" in [m.id for m in client.models.list().data]
    assert ask(client, "again", "hi").choices[0].message.content == ask(client, "fine", "hi").choices[0].message.content
    status, gone = call("DELETE", server.url + "/v1/adapters/again", headers=headers)
    assert status == 200 and gone["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        ask(client, "again", "hi")
    assert [m.id for m in client.models.list().data] == [BASE, "fine", "yes"]
    # an adapter of another base (a tiny Llama of another vocabulary) is refused, and nothing changes
    other = tmp_path / "other-llama"
    other.mkdir()
    build_tiny_llama(other, sorted(set(CHAT_WORDS))[:40])
    attachment = peftlab.attach(llama(other), "lora", r=2)
    folder = attachment.save(tmp_path / "other-adapter")
    status, refused = call("POST", server.url + "/v1/adapters", {"name": "odd", "path": str(folder)}, headers)
    assert status == 400 and "different base model" in refused["error"]["message"]
    status, missing = call("DELETE", server.url + "/v1/adapters/nope", headers=headers)
    assert status == 404 and missing["error"]["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == [BASE, "fine", "yes"]
    assert ask(client, "fine", "hi").choices[0].message.content


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("unknown model", "chat/completions", {"model": "nope", "messages": HI}, HEADERS, 404, "model_not_found"),
    ("above the limit", "chat/completions", {"model": "fine", "messages": HI, "max_tokens": 65}, HEADERS, 400,
     "max_tokens_above_limit"),
    ("beyond the context", "completions", {"model": "fine", "prompt": "hi " * 100, "max_tokens": 60}, HEADERS, 400,
     "context_length_exceeded"),
    ("malformed JSON", "chat/completions", b'{"model": "fine", "messages": [', HEADERS, 400, "invalid_json"),
    ("missing messages", "chat/completions", {"model": "fine"}, HEADERS, 400, "missing_field"),
    ("bad role", "chat/completions", {"model": "fine", "messages": [{"role": "robot", "content": "x"}]}, HEADERS,
     400, "invalid_value"),
    ("negative max_tokens", "completions", {"model": "fine", "prompt": "hi", "max_tokens": -1}, HEADERS, 400,
     "invalid_value"),
    ("bad API key", "chat/completions", {"model": "fine", "messages": HI}, {"Authorization": "Bearer wrong"}, 401,
     "invalid_api_key"),
    ("no API key", "models", None, {}, 401, "invalid_api_key"),
    ("no such route", "nothing", None, HEADERS, 404, None),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,headers,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, name, path, body, headers, status, code):
    got, answer = call("GET" if body is None else "POST", f"{server.url}/v1/{path}", body, headers)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == code
    assert ask(client, "fine", "hi", max_tokens=3).choices[0].message.content  # still serving


def test_serve_without_the_extra_names_it(cli, monkeypatch, tiny_llama_dir):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, _, err = cli("serve", "--model", tiny_llama_dir)
    assert code == 2 and err.startswith("error: ") and "pip install 'peftlab[serve]'" in err
    assert err.count("\n") == 1
    code, _, err = cli("serve", "--model", tiny_llama_dir, "--adapter", "no-name")
    assert code == 2 and err == "error: peftlab serve: --adapter expects NAME=FOLDER, got 'no-name'\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_answers(tiny_llama_dir, adapters):
    port = free_port()
    command = [sys.executable, "-m", "peftlab", "--no-progress", "serve", "--model", str(tiny_llama_dir),
               "--adapter", f"fine={adapters['fine']}", "--port", str(port), "--api-key", KEY]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 90
        while True:
            try:
                assert [m.id for m in client.models.list().data] == [str(tiny_llama_dir), "fine"]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.3)
        assert ask(client, "fine", "hi").choices[0].message.content.startswith("fine")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_load_batched_and_one_at_a_time(server):
    models = ["fine", "yes", BASE]
    results = {}
    try:
        for label, max_batch in (("batched", 8), ("one at a time", 1)):
            server.engine.max_batch = max_batch
            results[label] = load_test(server.url + "/v1", models, clients=8, seconds=2.0, max_tokens=16,
                                       api_key=KEY)  # fmt: skip
    finally:
        server.engine.max_batch = 8
    for label, r in results.items():
        print(f"\nload ({label}): {r['requests']} requests in {r['seconds']} s, {r['requests_per_s']:.1f} requests/s, "
              f"{r['tokens_per_s']:.1f} tokens/s, {r['failures']} failures")  # fmt: skip
        assert r["requests"] > 0 and r["failures"] == 0, r["first_errors"]
