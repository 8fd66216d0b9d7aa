"""The serving engine behind ``peftlab serve``: one base decoder, named LoRA adapters, requests batched together.

Requests arrive from any thread (the HTTP server's event loop) and wait in a queue. One worker thread owns the
model: it takes the first waiting request, gathers more for a short window (up to ``max_batch``), and decodes
them in one batch (``batch_decode.decode_together``) through ``MultiLoraModel``, each row with its own adapter
or the base. Adapters are loaded and unloaded between batches: the multi-adapter wrapper is rebuilt over the
plain model with the new set (an adapter of another base is refused before anything changes).

Nothing here knows HTTP; ``compose.server`` turns requests and events into OpenAI-shaped JSON.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .batch_decode import DecodeRow, decode_together
from .library import LoraModule, check_model, check_same_body, read_lora
from .multi import MultiLoraModel


class UnknownModel(InputError):
    """The request names neither the base model nor a loaded adapter (HTTP 404)."""


@dataclass
class Job:
    """One queued request: its decode row, the adapter it asked for (None: the base), and where results go."""

    row: DecodeRow
    adapter: str | None
    on_done: Callable[[DecodeRow | None, Exception | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class ServeStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0


class ServingEngine:
    """A base decoder and its adapters behind a request queue and one decoding worker thread."""

    def __init__(self, model, tokenizer, base_name: str, max_batch: int = 8, window_s: float = 0.005):
        if max_batch < 1:
            raise InputError(f"max_batch: expected a positive integer, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch = max_batch
        self.window_s = window_s
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.context = context_length(model)
        self.modules: list[LoraModule] = []
        self.served: MultiLoraModel | None = None
        self.created = int(time.time())
        self.loaded_at: dict[str, int] = {}
        self.stats = ServeStats()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()  # held while decoding a batch or swapping adapters
        self.worker: threading.Thread | None = None

    # --- adapters -------------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Read a LoRA adapter folder (or run folder) and serve it as ``name``; refuses another base's adapter."""
        if not name or name == self.base_name or name in self.adapter_names:
            taken = "the base model's name" if name == self.base_name else "already loaded"
            raise InputError(f"adapter name {name!r}: expected a new, non-empty name ({taken})")
        module = read_lora(path, name)
        with self.lock:
            if self.modules:
                check_same_body(self.modules[0], module)
            else:
                check_model(self.model, [module])
            self.rebuild([*self.modules, module])
            self.loaded_at[name] = int(time.time())

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapter_names:
                raise UnknownModel(f"no adapter named {name!r} (adapters: {', '.join(self.adapter_names) or 'none'})")
            self.rebuild([m for m in self.modules if m.name != name])
            self.loaded_at.pop(name, None)

    def rebuild(self, modules: list[LoraModule]) -> None:
        """Wrap the plain model anew with ``modules`` (none: the plain model)."""
        if self.served is not None:
            self.served.unload()
            self.served = None
        self.modules = modules
        if modules:
            device = next(self.model.parameters()).device
            self.served = MultiLoraModel(self.model, modules, heads=False).to(device)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` field names (None for the base), or UnknownModel."""
        if model == self.base_name:
            return None
        if model in self.adapter_names:
            return model
        known = ", ".join([self.base_name, *self.adapter_names])
        raise UnknownModel(f"model {model!r} does not exist (served: {known})")

    # --- requests -------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.start()
        job.row.cancelled = job.cancelled.is_set
        self.jobs.put(job)

    def start(self) -> None:
        if self.worker is None:
            self.worker = threading.Thread(target=self.work, name="peftlab-serve-decoder", daemon=True)
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.jobs.put(None)
            self.worker.join(timeout=30)
            self.worker = None

    def gather(self, first: Job) -> tuple[list[Job], bool]:
        """The first job and those arriving within the window, up to max_batch; and whether a stop was asked."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, stopping = self.gather(first)
            self.run_batch(batch)
            if stopping:
                return

    def run_batch(self, batch: list[Job]) -> None:
        with self.lock:
            ready: list[tuple[Job, int]] = []
            for job in batch:
                if job.adapter is None:
                    ready.append((job, -1))
                elif job.adapter in self.adapter_names:
                    ready.append((job, self.adapter_names.index(job.adapter)))
                else:
                    job.on_done(None, UnknownModel(f"adapter {job.adapter!r} was unloaded before the request ran"))
            if not ready:
                return
            rows = [job.row for job, _ in ready]
            try:
                if self.served is None:
                    decode_together(self.model, self.tokenizer, rows, self.eos, self.pad)
                else:
                    with self.served.rows([slot for _, slot in ready]):
                        decode_together(self.model, self.tokenizer, rows, self.eos, self.pad)
            except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, never the worker
                for job, _ in ready:
                    job.on_done(None, error)
                return
            self.stats.batches += 1
            self.stats.rows += len(rows)
            self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        for job, _ in ready:
            job.on_done(job.row, None)


def load_engine(
    model: str,
    adapters: dict[str, str],
    max_batch: int = 8,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quiet: bool = True,
) -> ServingEngine:
    """An engine over a packaged, hub or local decoder (named as ``--model`` gives it) with the named adapters."""
    import torch

    from ..models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(model, quiet=quiet, allow_pickle=allow_pickle)
    decoder = load_causal_lm(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = ServingEngine(decoder.to(device), load_tokenizer(path, trust_remote_code), model, max_batch)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    return engine


def context_length(model) -> int | None:
    """The model's longest sequence (prompt and reply), from its config, or None if it names none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
