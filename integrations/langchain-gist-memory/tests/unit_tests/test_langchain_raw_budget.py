"""A token budget for raw recent turns (issue 16): from turn 8 on a chat reads at most half of its raw tokens,
and the last exchange always stays verbatim. A scripted 12-turn conversation on the tiny model."""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

TOPICS = ["the northern archive", "the mountain station", "the harbour museum", "the old observatory",
          "the river ferry", "the village library"]


def _user(t: int) -> str:
    topic = TOPICS[t % len(TOPICS)]
    return (f"Turn {t}: please tell me about {topic}, who looked after it in the early years of the century, "
            f"what was kept there in the long winters and how visitors were expected to reach it from the town. "
            f"I would also like to know which code was painted above its door and why it was chosen.")


def _assistant(t: int) -> str:
    topic = TOPICS[t % len(TOPICS)]
    return (f"About {topic}: a curator named Voss kept its ledgers from 1912 until the building changed hands in "
            f"the spring of 1920, and every map, letter and instrument was catalogued by hand in those years. "
            f"The code painted above the door was QX-{4400 + t}, chosen because it matched the first page of "
            f"the ledger that the curator opened on the day the doors first opened to the public.")


def _conversation(turn: int) -> list:
    msgs: list = [SystemMessage("You answer questions about local history.")]
    for t in range(1, turn):
        msgs += [HumanMessage(_user(t)), AIMessage(_assistant(t))]
    return msgs + [HumanMessage(_user(turn))]


def test_raw_token_budget_halves_what_a_long_chat_reads_and_keeps_the_last_exchange(gist_tiny):
    from langchain_gist_memory import ChatGist

    chat = ChatGist(model=gist_tiny, keep_recent=4, raw_token_budget=256, max_tokens=1)
    full = ChatGist(model=gist_tiny, keep_recent=1000, max_prompt_tokens=100_000, max_tokens=1)
    count = ChatGist(model=gist_tiny, keep_recent=4, max_tokens=1)  # the count alone, for comparison
    ratios, count_ratios = {}, {}
    for turn in range(1, 13):
        msgs = _conversation(turn)
        g = chat.invoke(msgs).response_metadata["gist"]
        raw = full.invoke(msgs).response_metadata["gist"]["positions_read"]  # everything read as text
        ratios[turn] = g["positions_read"] / raw
        count_ratios[turn] = count.invoke(msgs).response_metadata["gist"]["positions_read"] / raw

        # the last exchange (and the current message) are read verbatim, as chat messages
        plan = chat._plan(msgs, None, {})
        if turn == 1:
            assert plan.prompt == _user(1)
        else:
            assert plan.prompt[-1] == {"role": "user", "content": _user(turn)}
            assert plan.prompt[-3:-1] == [{"role": "user", "content": _user(turn - 1)},
                                          {"role": "assistant", "content": _assistant(turn - 1)}]
            assert g["raw_turns"] >= 2
        if turn >= 8:
            assert ratios[turn] <= 0.5, (turn, ratios)
    assert all(ratios[t] < count_ratios[t] for t in range(8, 13)), (ratios, count_ratios)


def test_raw_token_budget_zero_keeps_the_last_exchange_and_a_call_can_override(gist_tiny):
    from langchain_gist_memory import ChatGist

    chat = ChatGist(model=gist_tiny, keep_recent=6, raw_token_budget=0, max_prompt_tokens=100_000, max_tokens=1)
    msgs = _conversation(6)
    assert chat._plan(msgs, None, {}).info["raw_turns"] == 2
    assert chat._plan(msgs, None, {"raw_token_budget": None}).info["raw_turns"] == 6
    assert ChatGist(model=gist_tiny, keep_recent=6, max_prompt_tokens=100_000, max_tokens=1)._plan(msgs, None, {}).info["raw_turns"] == 6
