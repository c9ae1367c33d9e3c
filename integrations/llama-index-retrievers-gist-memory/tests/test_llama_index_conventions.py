"""LlamaIndex conventions: MetadataFilters, the framework's top-k default, no private Settings reads."""

from __future__ import annotations

import pathlib
import warnings

import pytest
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.vector_stores import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
from llama_index.retrievers.gist_memory import GistCompressedRetriever

Q = "archive code QX-4471 curator"


@pytest.fixture
def served(li_tiny_model, registry, nodes, embed):
    def make(**kw):
        return GistCompressedRetriever.from_defaults(nodes=nodes, model=li_tiny_model, registry=registry,
                                                     embed_model=embed, **kw)

    return make


def test_similarity_top_k_defaults_to_the_framework_constant(served):
    r = served()
    assert r.similarity_top_k == DEFAULT_SIMILARITY_TOP_K and len(r.retrieve(Q)) == DEFAULT_SIMILARITY_TOP_K


def test_metadata_filters(served):
    only = MetadataFilters(filters=[MetadataFilter(key="topic", value="station")])
    hits = served(filters=only, similarity_top_k=4).retrieve(Q)
    assert [h.node.metadata["topic"] for h in hits] == ["station"]
    either = MetadataFilters(filters=[MetadataFilter(key="topic", value=["fox", "python"], operator=FilterOperator.IN)])
    assert {h.node.metadata["topic"] for h in served(filters=either, similarity_top_k=4).retrieve(Q)} == {"fox", "python"}
    nested = MetadataFilters(filters=[MetadataFilters(filters=[MetadataFilter(key="topic", value="fox")])])
    assert [h.node.metadata["topic"] for h in served(filters=nested, similarity_top_k=4).retrieve(Q)] == ["fox"]


def test_unsupported_filters_say_what_to_use_instead(served):
    gt = MetadataFilters(filters=[MetadataFilter(key="year", value=1900, operator=FilterOperator.GT)])
    with pytest.raises(ValueError, match=r"operator '>'.*index.as_retriever\(filters="):
        served(filters=gt)
    anyof = MetadataFilters(filters=[MetadataFilter(key="topic", value="fox"), MetadataFilter(key="topic", value="x")],
                            condition=FilterCondition.OR)
    with pytest.raises(ValueError, match="condition 'or'"):
        served(filters=anyof)


def test_dict_filters_still_work_with_a_deprecation_warning(served):
    with pytest.warns(DeprecationWarning, match="MetadataFilters"):
        r = served(filters={"topic": "station"}, similarity_top_k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert [h.node.metadata["topic"] for h in r.retrieve(Q)] == ["station"]


def test_no_private_settings_reads():
    root = pathlib.Path(__file__).resolve().parents[1] / "llama_index"
    for path in root.rglob("*.py"):
        assert "Settings._" not in path.read_text(), path
