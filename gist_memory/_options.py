"""The model options every model-loading command shares, and loading the model they name.

Below both `gist_memory.cli` and `gist_memory.demo` (both import it; it imports neither). Importing it is cheap:
typer and rich only; torch, transformers and the model load inside `load_model`.

    @app.command()
    @model_options                      # adds --model --base --compressor --ratio --anchors --device --dtype
    def ask(question: str, opts: ModelOptions) -> None:
        gm, desc = opts.load()
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_RATIO = 4.0


class UserError(Exception):
    """A mistake the user can fix; reported as one line, exit status 1."""


# ---- the shared options --------------------------------------------------------------------------------------
_PANEL = "Model"
_OPTIONS: dict[str, Any] = {  # ModelOptions field -> its typer annotation (the order of --help)
    "model": Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A saved gist model folder (default: the shipped gist adapter).",
        rich_help_panel=_PANEL)],
    "base": Annotated[Optional[str], typer.Option(
        "--base", help="A base causal LM folder or hub id, compressed with --compressor "
        "(default base: the bundled SmolLM2-135M-Instruct).", rich_help_panel=_PANEL)],
    "compressor": Annotated[Optional[str], typer.Option(
        "--compressor", help="pool+anchors (training-free, default with --base), pool, or gist "
        "(fresh untrained gist tokens: for training).", rich_help_panel=_PANEL)],
    "ratio": Annotated[Optional[float], typer.Option(
        "--ratio", help="Target compression ratio: raw tokens per kept row (default 4).", rich_help_panel=_PANEL)],
    "anchors": Annotated[Optional[str], typer.Option(
        "--anchors", help="Anchor policy with --base: none, entities, capitalized, surprisal, "
        "capitalized+surprisal, recall, capitalized+recall.", rich_help_panel=_PANEL)],
    "device": Annotated[Optional[str], typer.Option(
        "--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available).", rich_help_panel=_PANEL)],
    "dtype": Annotated[Optional[str], typer.Option(
        "--dtype", help="float32, bfloat16, float16 or auto (default: fp32 on CPU, bf16 on CUDA).",
        rich_help_panel=_PANEL)],
}


@dataclass(frozen=True)
class ModelOptions:
    """Which model a command loads: `--model` (a saved gist model) or `--base` with `--compressor`/`--anchors`,
    plus `--ratio`, `--device` and `--dtype`. All None: the shipped adapter (or, while none ships, the
    training-free `pool+anchors` compressor over the bundled base)."""

    model: Optional[str] = None
    base: Optional[str] = None
    compressor: Optional[str] = None
    ratio: Optional[float] = None
    anchors: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None

    def load(self) -> tuple[Any, str]:
        """`load_model` with these options: the GistModel and one line saying which it is."""
        return load_model(**asdict(self))


assert [f.name for f in fields(ModelOptions)] == list(_OPTIONS)
DeviceOpt = _OPTIONS["device"]  # also taken alone (`gist-memory train --device`)

F = TypeVar("F", bound=Callable[..., Any])


def model_options(fn: F) -> F:
    """Give a typer command the shared model options; it receives them as one `opts: ModelOptions` argument.

    The command's own parameters keep their order; the model options follow them (under the "Model" panel of
    `--help`), before a trailing `json_out` if the command has one.
    """
    sig = inspect.signature(fn, eval_str=True)
    if "opts" not in sig.parameters:
        raise TypeError(f"{fn.__name__} must take an `opts: ModelOptions` parameter")
    own = [p for p in sig.parameters.values() if p.name != "opts"]
    clash = set(_OPTIONS) & {p.name for p in own}
    if clash:
        raise TypeError(f"{fn.__name__} already has parameters {sorted(clash)}")
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
             for name, ann in _OPTIONS.items()]
    # keyword-only: typer passes every parameter by name, and any order of defaults stays a valid signature
    kw_only = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    params = [p for p in kw_only if p.name != "json_out"] + added + [p for p in kw_only if p.name == "json_out"]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        opts = ModelOptions(**{name: kwargs.pop(name, None) for name in _OPTIONS})
        return fn(*args, opts=opts, **kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    if sig.return_annotation is not inspect.Signature.empty:
        command.__annotations__["return"] = sig.return_annotation
    return command  # type: ignore[return-value]


# ---- loading -------------------------------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Silence progress bars and info logs of transformers / sentence-transformers (ours are rich bars)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    import logging

    for name in ("sentence_transformers", "faiss", "gist_memory.store.memory", "gist_memory.store.ingest"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_threads(spec: Optional[str] = None) -> Optional[int]:
    """Set torch's CPU threads from `spec` (a number or `auto`; default `$GIST_MEMORY_THREADS`); returns the count.

    `auto` uses the cores other processes leave idle (1-minute load average), at least 1: on a busy machine,
    OpenMP threads that wait for a descheduled sibling stall every operation, and one thread is much faster.
    Nothing is changed when neither is set, or when OMP_NUM_THREADS is set.
    """
    spec = spec if spec is not None else os.environ.get("GIST_MEMORY_THREADS")
    if not spec or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    if spec == "auto":
        n = os.cpu_count() or 1
        try:
            idle = n - os.getloadavg()[0]
        except OSError:
            idle = n
        want = max(1, min(torch.get_num_threads(), int(idle)))
    else:
        try:
            want = int(spec)
        except ValueError:
            raise UserError(f"threads must be a number or 'auto', got {spec!r}") from None
        if want < 1:
            raise UserError(f"threads must be >= 1, got {want}")
    torch.set_num_threads(want)
    return want


_MODEL_CACHE: dict[tuple, tuple[Any, str]] = {}


def load_model(
    model: Optional[str] = None,
    base: Optional[str] = None,
    compressor: Optional[str] = None,
    ratio: Optional[float] = None,
    anchors: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> tuple[Any, str]:
    """The GistModel the options name, and one line saying which it is.

    `--model` loads a saved gist model; `--base`/`--compressor` build one over a base LM; neither loads the
    shipped adapter, or (while none ships) the training-free `pool+anchors` compressor over the bundled base.
    The last model loaded is kept for reuse within the process (tests, notebooks).
    """
    if model and (base or compressor or anchors):
        raise UserError("give either --model (a saved gist model) or --base/--compressor/--anchors, not both")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if ratio is not None and not ratio >= 1.0:
        raise UserError(f"--ratio must be >= 1, got {ratio}")
    if model is not None and not Path(model).is_dir():
        raise UserError(f"no gist model folder at {model}")
    key = (model, base, compressor, ratio, anchors, device, dtype)
    set_threads()
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    quiet_libraries()
    from rich.console import Console

    from gist_memory.config import GistConfig
    from gist_memory.model import GistModel
    from gist_memory.model.gist_model import default_model_dir

    with Console(stderr=True).status("loading model ...", spinner="dots"):
        # an adapter trained over several ratios serves each of them
        overrides = {"config_overrides": {"target_ratio": float(ratio)}} if ratio is not None else {}
        if model is not None:
            gm = GistModel.from_pretrained(model, device=device, dtype=dtype, **overrides)
            desc = f"gist model {model} ({gm.name})"
        elif base is not None or compressor is not None or anchors is not None:
            kw: dict[str, Any] = {"compressor": compressor or "pool+anchors", "target_ratio": ratio or DEFAULT_RATIO}
            if anchors is not None:
                kw["anchors"] = anchors
            gm = GistModel.from_base(base, GistConfig(**kw), device=device, dtype=dtype)
            desc = f"{gm.base_ref} with the {gm.config.compressor} compressor at {gm.config.target_ratio:g}x"
            if gm.config.compressor == "gist":
                desc += " (untrained gist tokens: train them with `gist-memory train`)"
        else:
            try:
                path = default_model_dir()
            except FileNotFoundError:
                path = None
            if path is not None:
                gm = GistModel.from_pretrained(None, device=device, dtype=dtype, **overrides)
                desc = f"shipped gist adapter ({gm.name})"
            else:
                cfg = GistConfig(compressor="pool+anchors", target_ratio=ratio or DEFAULT_RATIO)
                gm = GistModel.from_base(None, cfg, device=device, dtype=dtype)
                desc = (f"{gm.base_ref} with the training-free pool+anchors compressor at {cfg.target_ratio:g}x "
                        "(no shipped gist adapter yet)")
        if ratio is not None and overrides and (model is not None or "shipped" in desc):
            desc += f", ratio {ratio:g}x"
    _MODEL_CACHE.clear()
    _MODEL_CACHE[key] = (gm, desc)
    return gm, desc
