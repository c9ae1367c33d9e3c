"""`ray_ingest`: fill a `GistMemory` from files with the compression spread over a Ray cluster (Ray Data).

    from gist_memory.distributed import ray_ingest

    summary = ray_ingest(["docs/", "corpus.parquet"], "memories/docs", address="ray://head:10001")

The driver (this process) lists the files, opens the memory and starts a Ray Data pipeline (`stages`): tasks read
and chunk the files, an actor pool (one model load per actor; GPU actors when the cluster has GPUs, CPU actors
otherwise) compresses the passages and writes their states straight into the memory's store, and embeds them.
The driver receives the passages in input order and adds them to the docstore and the index as they arrive
(`GistMemory.add_texts`, which finds every state already stored), a batch at a time, so a job killed at any point
keeps what it committed, and a rerun skips every passage the memory has and every state the store has.

The result is the single-process ingest's (`gist-memory ingest`, or `ingest(..., commit_every=4 * batch_size)`):
same ids, texts and metadata, the same docstore rows in the same order, the same state tensors and metadata, and
the same search results. Each state is computed in the batch that ingest computes it in (a file's new texts in
runs of `batch_size`, `units` in `stages`), since a batch's padding changes the last bits of its states. The
exception: a text that is already in the store when its file comes up (it also occurs in an earlier file, or an
earlier run stored it) is not compressed again by the single-process ingest, which shifts that file's later
batches; Ray ingest compresses a file's batches as they are, so those states agree to float rounding only.
With a sentence-transformers embedder the vectors agree to float rounding too (it pads each batch).

Every node must see the input files at the paths the driver gives, and, for the workers to write states
themselves, the memory's store: a local folder on a file system they share, or a shared store (`states=`, e.g.
`s3://...`). Workers that do not see a local store folder hand their encoded states to the driver, which writes
them (`write_states`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from gist_memory.distributed.connect import connect
from gist_memory.store.ingest import IngestSummary, _collect

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".txt", ".md", ".markdown", ".jsonl", ".parquet")
WRITE_MODES = ("auto", "workers", "driver")
_MAX_INPUT_BLOCKS = 1024


# ---- summary ---------------------------------------------------------------------------------------------------
@dataclass
class RayIngestSummary(IngestSummary):
    """What a `ray_ingest` run did: `IngestSummary`'s fields, plus

    Attributes:
        states_compressed: Passages whose state this run computed.
        states_found: Passages whose state was in the store already (a rerun after a kill).
        state_bytes_written: Bytes of the state entries this run wrote.
        actors: Compression actors; `device`: their device; `batch_size`: passages per compression batch.
        address: The Ray cluster ("local": one this call started).
        driver_peak_rss: Peak resident memory of the driver process, bytes.
        model_record: What `model_record` returned for the probed model (None without one).
    """

    states_compressed: int = 0
    states_found: int = 0
    state_bytes_written: int = 0
    actors: int = 0
    device: str = ""
    batch_size: int = 0
    address: str = ""
    driver_peak_rss: int = 0
    model_record: Any = None

    def __str__(self) -> str:
        return (super().__str__() + f"\nstates compressed: {self.states_compressed}, found in the store: "
                f"{self.states_found}, {self.state_bytes_written / 2**20:.1f} MiB written; {self.actors} actor(s) on "
                f"{self.device}, batch {self.batch_size}")


# ---- the driver's view of the model and the embedder --------------------------------------------------------------
class _ProbedModel:
    """What `GistMemory` needs of the model on the driver: the probe's fingerprint and name, and the workers'
    normalised texts. It never compresses: every state is in the store before its row is added."""

    tokenizer: Any = None

    def __init__(self, fingerprint: str, name: str) -> None:
        self.fingerprint, self.name = fingerprint, name
        self.norms: dict[str, str] = {}

    def normalize(self, text: str) -> str:
        try:
            return self.norms[text]
        except KeyError:
            raise ValueError("ray_ingest: a text reached the memory without its worker's normalisation") from None

    def compress(self, texts: Sequence[str], batch_size: int = 8) -> list:
        raise RuntimeError(f"ray_ingest: {len(texts)} state(s) missing from the store after the workers wrote "
                           f"them (was the store changed during the run?)")

    def generate(self, *a: Any, **kw: Any) -> str:
        raise RuntimeError("the model of a ray_ingest driver does not generate")


class _WorkerVectors:
    """An embedder standing in for the memory's own on the driver: it returns the vectors the workers computed
    (raw, so the memory's normalisation makes them bit-for-bit its embedder's); `name` is the real one's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.vecs: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        try:
            return np.stack([self.vecs[t] for t in texts])
        except KeyError:
            raise ValueError("ray_ingest: a text reached the memory without its worker's embedding") from None


def _memory_kwargs(index: Optional[str], storage_dtype: Optional[str], states: Any,
                   storage_options: Optional[dict], fsync: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"index": index, "storage_dtype": storage_dtype, "fsync": fsync}
    if states is not None:
        kw["states"] = states
    if storage_options is not None:
        kw["storage_options"] = storage_options
    return kw


def _store_spec(store: Any) -> tuple[str, bool]:
    """(authoritative tier as a folder or URL, is it a local folder) of a `GistStore`."""
    from gist_memory.store.backends import LocalFolderBackend

    tier = store.backend
    if isinstance(tier, LocalFolderBackend):
        return tier.path, True
    url = getattr(tier, "url", None)
    if not isinstance(url, str) or url == "ram":
        raise ValueError(f"ray_ingest needs a memory whose states live in a folder or a shared store; got {tier!r}")
    return url, False


# ---- progress ------------------------------------------------------------------------------------------------------
class _Progress:
    """Files done / total with passages and passages/s: a tqdm bar on a terminal, else a line every 15 s."""

    EVERY_S = 15.0

    def __init__(self, total_files: int, show: bool) -> None:
        self.total, self.show, self.done = total_files, show, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_files, desc="ray ingest", unit="file", file=sys.stderr)

    def update(self, files: int, s: Any) -> None:
        self.done += files
        dt = time.perf_counter() - self.t0
        rate = s.passages_added / dt if dt > 0 else 0.0
        text = f"{s.passages_added} passages added, {s.passages_present} present, {rate:.1f} passages/s"
        if self.bar is not None:
            self.bar.update(files)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.show and (time.perf_counter() - self.last >= self.EVERY_S or self.done == self.total):
            self.last = time.perf_counter()
            print(f"ray ingest: {self.done}/{self.total} files, {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rss_peak() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


# ---- the entry point ---------------------------------------------------------------------------------------------
def ray_ingest(
    inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    memory: Union[str, os.PathLike],
    model: Any = None,
    *,
    embedder: Any = None,
    index: Optional[str] = None,
    storage_dtype: Optional[str] = None,
    states: Any = None,
    storage_options: Optional[dict] = None,
    address: Optional[str] = None,
    num_actors: Optional[int] = None,
    batch_size: Optional[int] = None,
    use_gpu: Optional[bool] = None,
    max_passage_tokens: int = 256,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    write_states: str = "auto",
    fsync: bool = True,
    progress: bool = True,
    on_progress: Optional[Callable[[Any], None]] = None,
    model_record: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """Compress files into the persistent memory at `memory` on a Ray cluster; resumable, like `ingest`.

    Args:
        inputs: Files and folders (folders recursively; hidden entries skipped): `.txt`/`.md` text, `.jsonl`
            records (`text`, optional `id` and `metadata`), `.parquet` (a `text` column, optional `id` and
            `metadata`; other scalar columns join the metadata). Every Ray node must see them at the same paths.
        memory: The memory folder (created if new; the same folder `GistMemory(model, memory)` opens).
        model: What each actor loads: None (the default model, as `gist-memory ingest` without model options), a
            saved gist model folder, a dict of `gist-memory` model options (`model`, `base`, `compressor`,
            `ratio`, `anchors`, `device`, `dtype`), or a picklable factory called with no arguments.
        embedder: The memory's embedder (as `GistMemory`'s; None: the recorded or default one), loaded per actor.
        index, storage_dtype: As `GistMemory`'s (for a new memory).
        states, storage_options: Where the memory's states live, as `GistMemory`'s (a folder or URL is recorded
            in the memory; the actors write there).
        address: None or "local" (start a local Ray and stop it at the end), "auto", "ray://host:port" or
            "host:port". Ignored when this process is already connected to Ray.
        num_actors: Compression actors (default: one per GPU; on CPUs, CPUs - 1, at least 1).
        batch_size: Passages per compression batch (default: 8 on CPU, as the single-process ingest; on GPU sized
            to the GPU's free memory). The states are the single-process ingest's with the same batch size.
        use_gpu: GPU actors (None: when the cluster has GPUs).
        max_passage_tokens: Token budget of a passage.
        extensions: File types taken from folders.
        write_states: "auto" (workers write states into the store when they see it, else the driver does),
            "workers" or "driver".
        fsync: fsync state files (and the folders they land in) in a local store, as `GistMemory(fsync=...)`:
            durable across a power cut; a killed process is safe either way.
        progress: Show progress on stderr (a bar on a terminal, else a line every 15 s).
        on_progress: Called with the running summary after every commit.
        model_record: Called on the probed model in the cluster; its (picklable) result is `summary.model_record`.

    Returns:
        A `RayIngestSummary` (`IngestSummary` plus states compressed/found, bytes written, actors, device).

    Raises:
        FileNotFoundError: No input exists.
        ValueError: No readable input file of a supported type; a bad option; a memory of another model.
        ConnectionError: No Ray cluster at `address`.
    """
    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if write_states not in WRITE_MODES:
        raise ValueError(f"write_states must be one of {WRITE_MODES}, got {write_states!r}")
    if max_passage_tokens < 8:
        raise ValueError(f"max_passage_tokens must be >= 8, got {max_passage_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_actors is not None and num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if memory is None:
        raise ValueError("ray_ingest needs a memory folder (the workers write into its store)")
    if hasattr(model, "compress") and hasattr(model, "fingerprint"):
        raise ValueError("ray_ingest takes what each actor loads (a folder, load_model options or a factory), not "
                         "a loaded model")
    memory = os.path.abspath(os.fspath(memory))
    if os.path.exists(memory) and not os.path.isdir(memory):
        raise ValueError(f"memory {memory} exists and is not a folder")
    summary = RayIngestSummary()
    files = _collect([os.fspath(p) for p in inputs], extensions, summary)
    if not files:
        missing = [p for p, why in summary.files_skipped if why == "no such file or folder"]
        if missing and len(missing) == len(summary.files_skipped):
            raise FileNotFoundError(f"no such file or folder: {', '.join(missing)} (nothing to ingest)")
        raise ValueError(f"nothing to ingest in {', '.join(map(os.fspath, inputs))}: no {'/'.join(extensions)} "
                         f"files ({len(summary.files_skipped)} skipped)")

    import ray

    started = connect(address)
    mem = None
    token_path = None
    try:
        resources = ray.cluster_resources()
        n_gpu, n_cpu = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        if use_gpu is None:
            use_gpu = n_gpu >= 1
        if use_gpu and n_gpu < 1:
            raise ValueError("use_gpu=True, but the Ray cluster has no GPU")
        actors = num_actors or (int(n_gpu) if use_gpu else max(1, int(n_cpu) - 1))
        if use_gpu and actors > n_gpu:
            raise ValueError(f"num_actors={actors} GPU actors, but the Ray cluster has {n_gpu:g} GPU(s)")
        if not use_gpu and actors * 0.25 > n_cpu - 0.25:
            raise ValueError(f"num_actors={actors} CPU actors do not fit the cluster's {n_cpu:g} CPU(s) (each takes at "
                             f"least a quarter CPU, and the chunking tasks a quarter)")
        # CPU actors leave a quarter CPU to the chunking tasks, or the pipeline would wait for CPUs forever
        actor_cpus = 1.0 if use_gpu else max(0.25, min(1.0, (n_cpu - 0.25) / actors))
        device = None if use_gpu else "cpu"
        remote = {"num_cpus": actor_cpus, "num_gpus": 1 if use_gpu else 0}
        info = _probe(model, device, remote, max_passage_tokens, model_record)
        logger.info("ray_ingest: probed %s on %s in %.1f s", info["name"], info["host"], time.perf_counter() - t0)
        bsz = int(batch_size or info["batch_size"])

        # the memory: opened once with its real embedder (records it, checks the model), then with the workers'
        from gist_memory.store.memory import GistMemory

        probed = _ProbedModel(info["fingerprint"], info["name"])
        mkw = _memory_kwargs(index, storage_dtype, states, storage_options, fsync)
        first = GistMemory(probed, memory, embedder=embedder, **mkw)
        try:
            real_embedder = first._embedder
            dtype = first.storage_dtype
            store, local = _store_spec(first.store)
            present_ids = first.ids()
        finally:
            first.close()
        vectors = _WorkerVectors(real_embedder.name)
        mkw["storage_dtype"] = None
        mem = GistMemory(probed, memory, embedder=vectors, **mkw)
        token = None
        if local and write_states != "driver":
            token = (_token_name(), uuid.uuid4().hex)
            token_path = os.path.join(store, token[0])
            with open(token_path, "w", encoding="utf-8") as f:
                f.write(token[1])

        from gist_memory.distributed import stages

        logger.info("ray_ingest: probe and memory ready after %.1f s", time.perf_counter() - t0)
        shared = stages.Shared(ray.put(info["tokenizer"]), ray.put(stages.id_digests(present_ids)))
        del present_ids
        ctx = ray.data.DataContext.get_current()
        saved_ctx = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
                     ctx.target_max_block_size)
        ctx.execution_options.preserve_order = True  # commit in the single-process ingest's order
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # small blocks (Ray Data gathers a task's output up to this size): a file's units reach the actors a few at
        # a time, spread over them, and their passages stream back to the driver as they are made
        ctx.target_max_block_size = stages.BLOCK_BYTES
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), _MAX_INPUT_BLOCKS))
        # on CPUs the actors leave a quarter CPU to one chunking task at a time
        chunk_pool = ray.data.TaskPoolStrategy(size=None if use_gpu else 1)
        ds = ds.map_batches(stages.chunk_files, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                            compute=chunk_pool,
                            fn_kwargs={"shared": shared, "max_passage_tokens": max_passage_tokens, "batch_size": bsz})
        ds = ds.map_batches(  # one unit (one compression batch) per call
            stages.CompressUnits, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), **remote,
            fn_constructor_kwargs={"model": model, "device": device, "fingerprint": info["fingerprint"],
                                   "store": store if write_states != "driver" else None,
                                   "storage_options": storage_options, "storage_dtype": dtype, "token": token,
                                   "write": write_states, "fsync": fsync, "embedder": real_embedder,
                                   "batch_size": bsz},
        )
        summary.actors, summary.batch_size, summary.device = actors, bsz, info["device"]
        summary.address = ("local" if started and address in (None, "local")
                           else str(address or ray.get_runtime_context().gcs_address))
        summary.model_record = info["record"]
        try:
            _drain(ds, mem, probed, vectors, summary, len(files), bsz, progress, on_progress)
        finally:
            (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.target_max_block_size) = saved_ctx
        mem.save()
    except Exception as e:
        cause = _user_cause(e) if type(e).__module__.startswith("ray.") else None
        if cause is not None:
            raise cause from None
        raise
    finally:
        if token_path is not None:
            try:
                os.unlink(token_path)
            except OSError:
                pass
        if mem is not None:
            mem.close()
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    summary.driver_peak_rss = _rss_peak()
    return summary


def _token_name() -> str:
    """Name of the token file the driver writes into a local store folder for the duration of a run."""
    from gist_memory.distributed.stages import TOKEN_PREFIX

    return f"{TOKEN_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _probe(model: Any, device: Optional[str], remote: dict[str, Any], max_passage_tokens: int,
           record: Optional[Callable[[Any], Any]]) -> dict[str, Any]:
    """Load the model once and ask it what the driver needs (`stages.Probe`).

    On a one-node cluster on this machine without GPU actors the driver loads it itself (the actors will load
    the same files on the same CPUs); elsewhere an actor of the compression actors' shape does, in the cluster.
    """
    import ray

    from gist_memory.distributed.stages import Probe

    if not remote.get("num_gpus") and _cluster_is_this_machine():
        from gist_memory import _options

        cached = set(_options._MODEL_CACHE)
        probe = Probe(model, device)
        try:
            return probe.info(max_passage_tokens, record)
        finally:
            del probe
            for key in set(_options._MODEL_CACHE) - cached:  # loaded for the probe only: not kept in the driver
                _options._MODEL_CACHE.pop(key, None)
    actor = ray.remote(**remote)(Probe).remote(model, device)
    try:
        return ray.get(actor.info.remote(max_passage_tokens, record))
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        raise _user_cause(e) or e from None
    finally:
        ray.kill(actor)


def _cluster_is_this_machine() -> bool:
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - unknown (Ray Client): probe in the cluster
        return False


def _user_cause(e: BaseException) -> Optional[BaseException]:
    """The user-fixable error (bad path, bad option, missing package) behind a Ray task or actor error, if any."""
    seen = 0
    cur: Any = e
    while cur is not None and seen < 5:
        if isinstance(cur, (ValueError, OSError, ImportError)) or type(cur).__name__ == "UserError":
            if not type(cur).__module__.startswith("ray."):
                return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    return None


def _drain(ds: Any, mem: Any, probed: _ProbedModel, vectors: _WorkerVectors, summary: Any, n_files: int,
           batch_size: int, progress: bool, on_progress: Optional[Callable[[Any], None]]) -> None:
    """Consume the pipeline's passage rows in input order and commit them to `mem`, a block at a time."""
    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.WARNING)  # not its per-operator progress lines: ours say it in passages
    notice = logging.getLogger("ray.data._internal.progress")  # "Progress bars disabled ...": ours are on
    notice.addFilter(_no_progress_bar_notice)
    bar = _Progress(n_files, progress)
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            group: list[dict[str, Any]] = []
            files_done = 0
            for r in block.to_pylist():
                if r["kind"] == "file":
                    _commit(group, mem, probed, vectors, summary, batch_size)
                    group = []
                    _file_info(summary, json.loads(r["info"]))
                    files_done += 1
                else:
                    group.append(r)
            _commit(group, mem, probed, vectors, summary, batch_size)
            bar.update(files_done, summary)
            if on_progress is not None:
                on_progress(summary)
    finally:
        bar.close()
        ray_data_log.setLevel(level)
        notice.removeFilter(_no_progress_bar_notice)


def _no_progress_bar_notice(record: logging.LogRecord) -> bool:
    return "Progress bars disabled" not in record.getMessage()


def _file_info(summary: Any, info: dict[str, Any]) -> None:
    summary.files_read += int(info["files_read"])
    summary.files_skipped += [tuple(x) for x in info["files_skipped"]]
    summary.records_skipped += [tuple(x) for x in info["records_skipped"]]
    summary.passages_present += int(info["passages_present"])


def _commit(rows: list[dict[str, Any]], mem: Any, probed: _ProbedModel, vectors: _WorkerVectors, summary: Any,
            batch_size: int) -> None:
    """Add `rows` to the memory: states the driver must write first, then one `add_texts` (one transaction)."""
    if not rows:
        return
    blobs = {r["key"]: r["blob"] for r in rows if r["blob"] is not None}
    if blobs:
        created = mem.store.backend.put_many(blobs, overwrite=False)
        summary.state_bytes_written += sum(len(blobs[k]) for k in created)
    summary.state_bytes_written += sum(int(r["written"] or 0) for r in rows)
    late = mem.has_ids([r["id"] for r in rows])  # stored meanwhile (an earlier file of this run had the id)
    keep: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in rows:
        if r["id"] in late or r["id"] in seen:
            summary.passages_present += 1
            continue
        seen.add(r["id"])
        keep.append(r)
    for r in rows:
        if r["compressed"]:
            summary.states_compressed += 1
        else:
            summary.states_found += 1
    if not keep:
        return
    for r in keep:
        probed.norms[r["text"]] = r["norm"]
        vectors.vecs[r["text"]] = np.frombuffer(r["emb"], dtype=np.float32)
    try:
        mem.add_texts([r["text"] for r in keep], metadatas=[json.loads(r["meta"]) for r in keep],
                      ids=[r["id"] for r in keep], batch_size=batch_size, show_progress=False)
    finally:
        probed.norms.clear()
        vectors.vecs.clear()
    summary.passages_added += len(keep)
    summary.tokens_added += sum(int(r["ntok"]) for r in keep)
