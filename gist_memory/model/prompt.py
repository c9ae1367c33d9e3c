"""Prompting: checked chat messages, the chat template with a marked place for the gist states, token ids.

`GistModel._template` renders a prompt (a string or a conversation) with the model's chat template (or a plain
`Role: text` layout for base models) and cuts it where the states go: the text before them becomes the cached raw
prefix, the text after them the suffix the model reads as tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

_CONTEXT_MARK = "\u2063GIST-CONTEXT\u2063"
_ROLES = ("system", "user", "assistant")
Prompt = Union[str, Sequence[Mapping[str, str]]]


def _messages(prompt: Prompt, system_prompt: Optional[str]) -> list[dict[str, str]]:
    """A prompt string or a chat conversation as a checked list of {role, content} messages."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("messages is empty")
        msgs = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a mapping with str 'role' and 'content', got {m!r:.80}")
            if m["role"] not in _ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; roles are {', '.join(_ROLES)}")
            msgs.append({"role": m["role"], "content": m["content"]})
        if msgs[-1]["role"] != "user":
            raise ValueError(f"the last message must be the user's (the model answers it), got {msgs[-1]['role']!r}")
    else:
        raise TypeError(f"prompt must be a str or a list of messages, got {type(prompt).__name__}")
    if system_prompt:
        if msgs[0]["role"] == "system":
            raise ValueError("pass the system prompt either as system_prompt or as a system message, not both")
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


class Prompting:
    """Mixin of `GistModel`: prompt rendering and tokenisation (needs `self.tokenizer`)."""

    tokenizer: Any

    def _pad_id(self) -> int:
        t = self.tokenizer
        for cand in (t.pad_token_id, t.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def _template(
        self, prompt: Prompt, with_states: bool, system_prompt: Optional[str], context_prefix: str = ""
    ) -> tuple[str, str]:
        """(text before the spliced states, text after them) for a chat or plain model.

        `prompt` is a user message, or a conversation (`[{"role": ..., "content": ...}, ...]`, as for HF chat
        templates); the states go at the start of its first user message, after any system message.
        """
        msgs = _messages(prompt, system_prompt)
        if with_states or context_prefix:
            first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
            mark = (_CONTEXT_MARK + "\n\n") if with_states else ""
            msgs[first_user] = {**msgs[first_user], "content": context_prefix + mark + msgs[first_user]["content"]}
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            bos = tok.bos_token if (tok.bos_token and self._adds_bos()) else ""
            if len(msgs) == 1 or (len(msgs) == 2 and msgs[0]["role"] == "system"):  # a plain prompt, as before
                rendered = bos + "".join(m["content"] + "\n\n" for m in msgs[:-1]) + msgs[-1]["content"]
            else:
                turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs)
                rendered = bos + turns + "Assistant:"
        if not with_states:
            return rendered, ""
        if rendered.count(_CONTEXT_MARK) != 1:
            raise ValueError("the chat template altered the context marker; cannot place gist states")
        before, after = rendered.split(_CONTEXT_MARK)
        return before, after

    def template_ids(self, prompt: Prompt, system_prompt: Optional[str] = None,
                     context_prefix: str = "") -> tuple[list[int], list[int]]:
        """(ids before the states, ids after them) of `prompt` rendered as `prepare` renders it with states:
        what a peer method (or a test) needs to put its own context exactly where the states go."""
        before, after = self._template(prompt, True, system_prompt, context_prefix)
        return self.encode(before), self.encode(after)

    def _adds_bos(self) -> bool:
        t = self.tokenizer
        ids = t("a", add_special_tokens=True)["input_ids"]
        return bool(t.bos_token_id is not None and ids and ids[0] == t.bos_token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens ([] for empty text)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    _ids = encode
