"""The one loader of a checkpoint: a folder (`save_pretrained` output), a GGUF file, or the
embedded model by name, as a transformers model and tokenizer on the CPU.

Every user loads through `load_pretrained`: the transformers backend (generation, likelihood
scores, with its per-process cache and end-of-turn tokens, flows/models/transformers_backend.py),
the vLLM backend (a GGUF converted once to safetensors, flows/models/vllm_backend.py) and the
hf trainer (flows/training/trainers.py). With `trainable=True` every GGUF weight is unpacked
into a dense tensor and the model is an ordinary float one that can be trained and saved.

A GGUF's tokenizer is the one transformers reads from the file when it is fast and has a chat
template, else it is rebuilt from the file's vocabulary and merges (`gguf_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.models.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says why."""


def checkpoint_files(checkpoint: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of a checkpoint: the embedded model's name, a GGUF
    file or a checkpoint folder."""
    if str(checkpoint) == EMBEDDED_MODEL_NAME:
        path = embedded_gguf_path()
        return path.parent, path.name
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return path, None
    raise CheckpointError(f"needs a checkpoint folder, a .gguf file or {EMBEDDED_MODEL_NAME!r} (the embedded model)")


def gguf_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer: by transformers when it reads it as a fast tokenizer, else
    rebuilt from the file's vocabulary and merges (llama.cpp's `smollm` pre-tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if getattr(tokenizer, "is_fast", False) and tokenizer.chat_template:
            return tokenizer
    except Exception:  # noqa: BLE001 - fall back to the rebuild below
        pass
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = GGUFReader(path).fields

    def meta(key: str) -> Any:
        return fields[key].contents()

    tokens, kinds = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    if meta("tokenizer.ggml.model") != "gpt2" or meta("tokenizer.ggml.pre") != "smollm":
        raise CheckpointError(f"{path}: cannot rebuild its tokenizer (not a gpt2/smollm BPE vocabulary)")
    merges = [tuple(merge.split(" ")) for merge in meta("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, kinds, strict=True) if kind == 3]
    )
    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    named = {role: tokens[meta(f"tokenizer.ggml.{key}_token_id")] for role, key in keys.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    tokenizer.chat_template = meta("tokenizer.chat_template")
    return tokenizer


def _dequantized() -> dict[str, Any]:
    """Ask transformers to unpack every GGUF weight into a dense float tensor (trainable)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _plain_model(model: Any, dtype: str) -> Any:
    """A GGUF-loaded model as an ordinary one: transformers marks it quantized (not trainable,
    not serializable) even when every weight was unpacked; drop the mark once that is checked."""
    import torch

    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed or any(not p.dtype.is_floating_point for p in model.parameters()):
        what = ", ".join(packed) or "integer tensors"
        raise CheckpointError(f"the GGUF weights stayed packed ({what}): they cannot be trained")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(getattr(torch, dtype))


def load_pretrained(checkpoint: str | Path, dtype: str = "float32", trainable: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint on the CPU in `dtype`; with `trainable`, a GGUF's
    weights are unpacked into an ordinary model. Raises CheckpointError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = checkpoint_files(checkpoint)
    try:
        if gguf:
            tokenizer = gguf_tokenizer(folder / gguf)
            extra = {"gguf_file": gguf, **(_dequantized() if trainable else {})}
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), **extra)
            if trainable:
                model = _plain_model(model, dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the checkpoint whatever went wrong
        raise CheckpointError(f"cannot load it with transformers: {exc}") from exc
    return model, tokenizer
