"""`GistConfig.write_head`: the writer reads each text after the reader's prompt head, then drops the head's rows."""

from __future__ import annotations

import pytest
import torch

from gist_memory import GistConfig, GistModel
from gist_memory.eval.heldout.run import apart_config
from gist_memory.layout import window_starts
from gist_memory.model import kv

PASSAGE = "The old mill by the river was rebuilt after a flood in 1907. Visitors came in the summer to see Oslo."
QUESTION = "When was the mill rebuilt?"


def test_with_the_template_head_a_raw_state_reads_like_the_text_in_the_prompt(tiny_base_dir):
    """Uncompressed rows written after the head are the rows the reader caches for the text in its prompt, so
    scores match full text; written alone (no head) the text's first token starts a sequence and they do not."""
    scores = {}
    for head in ("none", "template"):
        gm = GistModel.from_base(tiny_base_dir, apart_config(head), device="cpu")
        full = gm.score(PASSAGE + "\n\n" + QUESTION, "In 1907.")
        scores[head] = (full, gm.score(QUESTION, "In 1907.", states=gm.compress([PASSAGE])))
    assert GistModel.from_base(tiny_base_dir, apart_config("template"), device="cpu").write_head()
    full, states = scores["template"]
    assert states == pytest.approx(full, abs=1e-4)
    full, states = scores["none"]
    assert abs(states - full) > 1e-4


def test_each_window_of_a_long_text_is_read_after_the_head(tiny_base_dir):
    gm = GistModel.from_base(tiny_base_dir, GistConfig(compressor="pool", target_ratio=1.0, anchors="none",
                                                       max_sentence_tokens=16, window_tokens=24,
                                                       write_head="template"), device="cpu")  # fmt: skip
    text = " ".join(f"Sentence {i} tells of the mill at Oslo and its {i} wheels." for i in range(8))
    st = gm.compress([text])[0]
    plan = gm.plan(text)
    ids = plan.ids.tolist()
    starts = window_starts(gm.segment(plan), 24) + [len(ids)]
    assert len(starts) > 2 and st.num_rows == len(ids)  # several windows, every row kept
    head = gm.write_head()
    P = len(head)
    for w0, w1 in zip(starts[:-1], starts[1:]):
        x = torch.tensor([head + ids[w0:w1]])
        pos = torch.arange(w0 - P, w1)[None]
        with torch.no_grad():
            out = gm.model.get_decoder()(input_ids=x, position_ids=pos, use_cache=True)
        for li, (k, v) in enumerate(kv.cache_layers(kv.out_cache(out))):
            assert torch.allclose(st.keys[li][:, w0:w1].float(), k[0, :, P:].float(), atol=1e-4), (w0, li)
            assert torch.allclose(st.values[li][:, w0:w1].float(), v[0, :, P:].float(), atol=1e-4), (w0, li)


def test_write_head_is_checked_and_part_of_the_fingerprint(tiny_base_dir):
    with pytest.raises(ValueError, match="write_head"):
        GistConfig(write_head="system")
    assert GistConfig(write_head="template").fingerprint() != GistConfig().fingerprint()
    assert GistConfig.from_dict(GistConfig(write_head="template").to_dict()).write_head == "template"
    a = GistModel.from_base(tiny_base_dir, apart_config("none"), device="cpu")
    b = GistModel.from_base(tiny_base_dir, apart_config("template"), device="cpu")
    assert a.write_head() == [] and a.fingerprint != b.fingerprint
    # a state written one way is not served to a model that writes the other way
    st = b.compress([PASSAGE])[0]
    with pytest.raises(ValueError):
        a.score(QUESTION, "In 1907.", states=[st])
