"""Bad input, fuzzed (hypothesis): the text -> plan -> layout path on the tiny model, and reading states, store
entries and memory folders. Every input ends in a correct result or a clear error (ValueError, StateFormatError,
FileNotFoundError), never another exception or a hang.

Deterministic (`derandomize=True`, no example database) and bounded: 40-80 examples per property, each under an
alarm of a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gist_memory.layout.layout import KIND_GIST_TOKEN, KIND_TEXT, Segment, build_layout  # noqa: E402
from gist_memory.state.gist_state import FORMAT, GistState, StateFormatError  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,  # the alarm below bounds each example; a busy CI machine must not make this flaky
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than `seconds` (a hang, not a slow example); main thread only."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(*_a: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- text ----------------------------------------------------------------------------------------------------
# any code point except lone surrogates (a Python str can hold them, but no text file or tokenizer can)
ANY_CHAR = st.characters(blacklist_categories=("Cs",))
CONTROL = st.sampled_from(["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\u200b", "\u2028",
                           "\u202e", "\ufeff", "\ufffd", "\r", "\r\n", "\t"])  # fmt: skip
WORD = st.text(alphabet=ANY_CHAR, min_size=0, max_size=12) | st.sampled_from(
    ["Maren", "Voss", "QX-4471", "1912", "the", "Привет", "日本語", "🙂", "...", "?!", "Dr.", "e.g.", ""]
)
SENTENCE = st.lists(WORD | CONTROL, min_size=0, max_size=14).map(" ".join)
END = st.sampled_from([".", "!", "?", "", " ", "\n", "\n\n", "...", ". .", "。"])
TEXT = st.lists(st.tuples(SENTENCE, END).map("".join), min_size=0, max_size=8).map("".join) | st.text(ANY_CHAR)


def _check_plan_and_layout(model, text: str) -> None:  # noqa: ANN001
    """plan -> segment -> layout of `text`, or a ValueError for a text with nothing to compress."""
    try:
        plan = model.plan(text)
    except ValueError:
        assert not model.normalize(text) or not model.encode(model.normalize(text))
        return
    n = plan.num_tokens
    assert n > 0 and len(plan.anchors) == n and plan.text == model.normalize(text)
    assert len(plan.pieces) == len(plan.n_other) == len(plan.char_spans) >= 1
    pos = 0
    for (s, e), (cs, ce) in zip(plan.pieces, plan.char_spans):
        assert s == pos and s < e and e - s <= model.config.max_sentence_tokens
        assert 0 <= cs <= ce <= len(plan.text)
        pos = e
    assert pos == n and all(g >= 0 for g in plan.n_other)
    assert 1 <= plan.num_kept <= n + sum(plan.n_other)
    seg = model.segment(plan)
    assert isinstance(seg, Segment) and list(seg.ids) == plan.ids.tolist()
    lay = build_layout([[seg]], pad_id=0, tails=[[1, 2, 3]])
    kinds = lay.kind[0]
    assert int((kinds == KIND_TEXT).sum()) == n
    assert int((kinds == KIND_GIST_TOKEN).sum()) == sum(seg.n_gists)
    assert int(lay.lengths[0]) == n + sum(seg.n_gists) + 3
    assert int(lay.position_ids.max()) < n + 3 + max(1, max(seg.n_gists, default=0))


@FUZZ
@given(text=TEXT)
@example(text="")
@example(text="   \n\t  ")
@example(text="\x00\x00\x00")
@example(text=". . . ! ? ")
@example(text="\u200b\ufeff\u202e")
@example(text="🙂" * 300)
@example(text="a" * 5000)
def test_any_text_plans_and_lays_out_or_is_refused(tiny_model, text):
    with time_limit(20):
        _check_plan_and_layout(tiny_model, text)


def test_a_10k_token_sentence_is_cut_into_pieces(tiny_model):
    """One sentence of ~10k tokens (no punctuation): pieces of at most max_sentence_tokens, a layout, a state."""
    text = " ".join(f"Word{i % 97} and more" for i in range(2500))
    with time_limit(120):
        plan = tiny_model.plan(text)
        assert plan.num_tokens >= 10_000
        _check_plan_and_layout(tiny_model, text)
        (state,) = tiny_model.compress([text])
    assert state.num_tokens == plan.num_tokens and state.num_kept == plan.num_kept
    assert bool(state.keys.isfinite().all()) and bool(state.values.isfinite().all())


@settings(FUZZ, max_examples=25)
@given(text=TEXT)
@example(text="\x00 Maren Voss.\x07 \u2028QX-4471!")
def test_any_text_compresses_to_a_readable_state_or_is_refused(tiny_model, text):
    with time_limit(30):
        try:
            plan = tiny_model.plan(text)
        except ValueError:
            with pytest.raises(ValueError):
                tiny_model.compress([text])
            return
        (state,) = tiny_model.compress([text])
        assert state.num_tokens == plan.num_tokens and state.num_kept == plan.num_kept
        assert bool(state.keys.isfinite().all())
        back = GistState.from_bytes(state.to_bytes())
        assert back.text == state.text and back.text_hash == state.text_hash
        assert bool((back.keys == state.keys).all())


def test_lone_surrogates_are_a_clear_error(tiny_model):
    """A str with a lone surrogate cannot be tokenised: a ValueError (UnicodeError is one), not a crash."""
    with pytest.raises(ValueError):
        tiny_model.plan("Maren Voss \ud800 became curator.")


# ---- states --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_bytes(tiny_model) -> bytes:
    (state,) = tiny_model.compress(["Maren Voss became the chief curator in 1912. The archive code is QX-4471!"])
    return state.to_bytes()


def _read_state(data: bytes, tmp_path, name: str = "s.gist") -> GistState:
    """from_bytes and load (memory-mapped file) must agree: both a state, or both StateFormatError."""
    path = tmp_path / name
    path.write_bytes(data)
    try:
        a = GistState.from_bytes(data)
    except StateFormatError:
        with pytest.raises(StateFormatError):
            GistState.load(path)
        raise
    b = GistState.load(path)
    assert a.text_hash == b.text_hash and bool((a.keys == b.keys).all())
    return a


@FUZZ
@given(data=st.data())
def test_truncated_state_is_a_format_error(state_bytes, tmp_path, data):
    cut = data.draw(st.integers(0, len(state_bytes) - 1))
    with time_limit(10), pytest.raises(StateFormatError):
        _read_state(state_bytes[:cut], tmp_path)


@FUZZ
@given(blob=st.binary(max_size=4096) | st.binary(min_size=8, max_size=64).map(lambda b: b"\x40\x00" + b))
@example(blob=b"")
@example(blob=b"\x00" * 8)
@example(blob=b"\xff" * 8 + b"{}")
@example(blob=(2**62).to_bytes(8, "little") + b"{")
@example(blob=(2).to_bytes(8, "little") + b"{}")
def test_random_bytes_are_a_format_error(tmp_path, blob):
    with time_limit(10), pytest.raises(StateFormatError):
        _read_state(blob, tmp_path)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_are_a_format_error_or_the_same_state(state_bytes, tmp_path, data):
    """A changed byte is caught (checksum, header checks) unless it only touched JSON whitespace/padding."""
    buf = bytearray(state_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    orig = GistState.from_bytes(state_bytes)
    with time_limit(10):
        try:
            got = _read_state(bytes(buf), tmp_path)
        except StateFormatError:
            return
    assert bool((got.keys == orig.keys).all()) and bool((got.values == orig.values).all())
    assert got.positions.tolist() == orig.positions.tolist() and got.kinds.tolist() == orig.kinds.tolist()


def _with_metadata(data: bytes, change) -> bytes:  # noqa: ANN001
    """A valid safetensors file with the same tensors and a changed metadata header."""
    from safetensors.torch import load, save

    from gist_memory.state.gist_state import _read_metadata

    meta = dict(_read_metadata(data))
    change(meta)
    return save(load(data), metadata=meta)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
HEADER_KEYS = ["span", "num_tokens", "sentence_spans", "text_hash", "model_fingerprint", "text", "meta"]


@FUZZ
@given(
    field_name=st.sampled_from(["format", "format_version", "checksum", "header"]),
    value=st.text(max_size=40) | JSON.map(json.dumps),
)
@example(field_name="format", value="gist-memory/store")
@example(field_name="format_version", value="2")
@example(field_name="header", value="{")
@example(field_name="header", value="[]")
def test_valid_file_with_a_wrong_header_is_a_format_error(state_bytes, tmp_path, field_name, value):
    orig = GistState.from_bytes(state_bytes)
    data = _with_metadata(state_bytes, lambda m: m.__setitem__(field_name, value))
    with time_limit(10):
        try:
            got = _read_state(data, tmp_path)
        except StateFormatError:
            return
    # only a header that says the same thing may pass
    assert field_name == "header" and got.text_hash == orig.text_hash and got.span == orig.span
    assert got.num_tokens == orig.num_tokens and got.model_fingerprint == orig.model_fingerprint


@FUZZ
@given(key=st.sampled_from(HEADER_KEYS), value=JSON, drop=st.booleans())
@example(key="sentence_spans", value=[[1]], drop=False)
@example(key="sentence_spans", value="ab", drop=False)
@example(key="span", value=None, drop=False)
@example(key="meta", value=[1, 2], drop=False)
def test_wrong_header_fields_are_a_format_error_or_read(state_bytes, tmp_path, key, value, drop):
    def change(meta: dict) -> None:
        h = json.loads(meta["header"])
        if drop:
            h.pop(key, None)
        else:
            h[key] = value
        meta["header"] = json.dumps(h)

    data = _with_metadata(state_bytes, change)
    with time_limit(10):
        try:
            got = _read_state(data, tmp_path)
        except StateFormatError:
            return
    assert isinstance(got.span, int) and isinstance(got.num_tokens, int) and isinstance(got.meta, dict)
    assert all(isinstance(a, int) and isinstance(b, int) for a, b in got.sentence_spans)


def test_infinite_number_in_header_is_a_format_error(state_bytes, tmp_path):
    def change(meta: dict) -> None:
        h = json.loads(meta["header"])
        h["num_tokens"] = float("inf")  # json writes Infinity, and reads it back
        meta["header"] = json.dumps(h)

    with pytest.raises(StateFormatError):
        _read_state(_with_metadata(state_bytes, change), tmp_path)


def test_foreign_safetensors_file_is_a_format_error(tmp_path):
    import torch
    from safetensors.torch import save

    data = save({"weight": torch.zeros(2, 2)}, metadata={"format": "pt"})
    with pytest.raises(StateFormatError, match="not a gist-memory state"):
        _read_state(data, tmp_path)
    with pytest.raises(StateFormatError):
        _read_state(save({"keys": torch.zeros(1)}, metadata={"format": FORMAT, "format_version": "1"}), tmp_path)


# ---- store entries -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def entry(tiny_model) -> tuple[bytes, str]:
    from gist_memory.store.store import encode_entry, key_for

    (state,) = tiny_model.compress(["The Prythwaite weather station sits at an altitude of 4,301 metres."])
    key = key_for(state.text_hash, state.model_fingerprint, "int8")
    return encode_entry(state, "int8", key), key


@FUZZ
@given(data=st.data())
def test_damaged_store_entries_are_a_format_error(entry, data):
    from gist_memory.store.store import decode_entry

    blob, key = entry
    how = data.draw(st.sampled_from(["truncate", "random", "flip", "wrong_key"]))
    if how == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "random":
        bad = data.draw(st.binary(max_size=2048))
    elif how == "flip":
        b = bytearray(blob)
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= 0xFF
        bad = bytes(b)
    else:
        bad = blob
        key = data.draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).filter(lambda k: k != key))
    with time_limit(10):
        try:
            got = decode_entry(bad, key)
        except StateFormatError:
            return
    # a flip that only touched JSON whitespace: the entry still decodes to the same state
    want = decode_entry(blob, entry[1])
    assert how == "flip" and bool((got.keys == want.keys).all()) and got.text_hash == want.text_hash


# ---- memory folders ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memory_dir(tiny_model, tmp_path_factory):
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import HashingEmbedder

    path = tmp_path_factory.mktemp("fuzz-mem") / "mem"
    with GistMemory(tiny_model, path, embedder=HashingEmbedder()) as mem:
        mem.add_texts(["Maren Voss became the chief curator in 1912.", "The archive code is QX-4471."])
    return path


def _damaged_copy(memory_dir, dst, bad: bytes):  # noqa: ANN001, ANN202
    import shutil

    from gist_memory.store.memory import DB_NAME

    shutil.copytree(memory_dir, dst)
    for side in ("-wal", "-shm"):
        (dst / (DB_NAME + side)).unlink(missing_ok=True)
    (dst / DB_NAME).write_bytes(bad)
    return dst


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_damaged_memory_database_is_an_error_not_a_hang(tiny_model, memory_dir, tmp_path_factory, data):
    """A memory folder whose docstore is truncated or random bytes: opening it fails with an error (or, when the
    damage missed every page it reads, opens with its passages), never a crash or a hang."""
    from gist_memory.store import GistMemory
    from gist_memory.store.memory import DB_NAME
    from gist_memory.store.testing import HashingEmbedder

    db = (memory_dir / DB_NAME).read_bytes()
    if data.draw(st.booleans()):
        bad = db[: data.draw(st.integers(0, len(db) - 1))]
    else:
        bad = data.draw(st.binary(min_size=0, max_size=8192))
    dst = _damaged_copy(memory_dir, tmp_path_factory.mktemp("damaged") / "mem", bad)
    with time_limit(20):
        try:
            mem = GistMemory.load(dst, model=tiny_model, embedder=HashingEmbedder())
        except ValueError:  # a damaged database is a ValueError naming the folder
            return
        try:
            assert len(mem) in (0, 2)  # an empty file is a fresh database; else every passage is there
        finally:
            mem.close()


def test_damaged_memory_database_is_a_value_error(tiny_model, memory_dir, tmp_path):
    from gist_memory.store import GistMemory
    from gist_memory.store.testing import HashingEmbedder

    dst = _damaged_copy(memory_dir, tmp_path / "mem", b"not a database at all" * 100)
    with pytest.raises(ValueError):
        GistMemory.load(dst, model=tiny_model, embedder=HashingEmbedder())
