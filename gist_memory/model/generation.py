"""Generation: the decode loop, sampling, end-of-turn ids, stop strings and constrained output.

A stop string never reaches the caller: text that could be the start of one is held back until the next token
decides, and the reply ends right before the first stop string.

`schema=` (JSON) and `tools=` (tool calls) constrain the output with a grammar (`gist_memory.model.constrained`):
each token is sampled among those the grammar allows, the output is closed in time to fit `max_new_tokens`, and
the end of sequence comes only where the grammar accepts. Stop strings apply only to free text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch

from gist_memory.model import kv
from gist_memory.model.constrained import Constraint, GrammarGuide, build_constraint, with_instructions
from gist_memory.model.prompt import Prompt
from gist_memory.model.usage import Usage, check_usage
from gist_memory.state import GistState

_GEN_KWARGS = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "stop",
    "seed",
    "system_prompt",
    "context_prefix",
    "schema",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}


class Generating:
    """Mixin of `GistModel`: `generate`, `generate_with_usage`, `stream` and the decode loop."""

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, *,
                 usage: Optional[Usage] = None, **kwargs: Any) -> str:
        """Answer `prompt` reading `states` (chat template applied for chat models).

        Keyword args (as in HF `generate`): max_new_tokens (64), do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, plus `stop` (strings), `seed`, `system_prompt` and `context_prefix`
        (raw text placed right before the states), and `usage` (a `Usage` this call fills).

        Constrained output (see `gist_memory.model.constrained`):

        - `schema`: a JSON-schema dict, a Pydantic model class or a TypedDict. The answer is one JSON value that
          validates against it (read it with `constrained.parse_json(text, schema)` or `json.loads`).
        - `tools`: OpenAI-style tool dicts (`{"type": "function", "function": {"name", "description",
          "parameters"}}`), with `tool_choice` ("auto" by default, "none", "any"/"required" or a tool's name) and
          `parallel_tool_calls` (True: one or more calls, one per line). Tool calls are written as
          `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; read them with
          `constrained.parse_tool_calls(text)`.

        Both describe the schema / tools in the system prompt, and close the answer early rather than cut it when
        `max_new_tokens` runs out (ValueError when even the shortest valid answer cannot fit). A ValueError names
        bad input: schema and tools together, tool_choice without tools or naming an unknown tool, an invalid
        schema.
        """
        return "".join(self.stream(prompt, states=states, usage=usage, **kwargs))

    def generate_with_usage(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None,
                            **kwargs: Any) -> tuple[str, Usage]:
        """`generate`, returning `(text, Usage)` of this call."""
        usage = Usage()
        text = self.generate(prompt, states=states, usage=usage, **kwargs)
        return text, usage

    def stream(self, prompt: Prompt, states: Optional[Sequence[GistState]] = None, *,
               usage: Optional[Usage] = None, **kwargs: Any) -> Iterator[str]:
        """Like `generate`, yielding text pieces as they are decoded; `usage` is filled when the stream ends
        (exhausted, closed, or failed)."""
        unknown = set(kwargs) - _GEN_KWARGS
        if unknown:
            raise TypeError(f"unsupported generation arguments: {sorted(unknown)}; supported: {sorted(_GEN_KWARGS)}")
        check_usage(usage)
        constraint = build_constraint(
            schema=kwargs.pop("schema", None), tools=kwargs.pop("tools", None),
            tool_choice=kwargs.pop("tool_choice", None), parallel_tool_calls=kwargs.pop("parallel_tool_calls", True),
        )
        guide = None
        if constraint is not None:  # compiled and checked now, so bad input fails here, not on the first next()
            guide = self.grammar_guide(constraint, kwargs.get("max_new_tokens", 64), kwargs.get("eos_token_id"))
            prompt, kwargs["system_prompt"] = with_instructions(prompt, kwargs.get("system_prompt"), constraint)
        return self._stream(prompt, states, usage, guide=guide, **kwargs)

    def grammar_guide(self, constraint: Constraint, max_new_tokens: int = 64,
                      eos_token_id: Optional[Union[int, list[int]]] = None) -> GrammarGuide:
        """The per-call token mask and budget of `constraint` for this model's tokenizer and vocabulary.

        Raises:
            ValueError: The grammar engine refuses the schema, or its shortest output exceeds `max_new_tokens`.
        """
        emb = self.model.get_output_embeddings()
        n_vocab = int(emb.weight.shape[0]) if emb is not None else int(self.model.config.vocab_size)
        return GrammarGuide(constraint, self.tokenizer, sorted(self._eos_ids(eos_token_id)), n_vocab,
                            int(max_new_tokens))

    @torch.no_grad()
    def _stream(
        self,
        prompt: Prompt,
        states: Optional[Sequence[GistState]],
        usage: Optional[Usage],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        guide: Optional[GrammarGuide] = None,
    ) -> Iterator[str]:
        t0 = time.perf_counter()
        layers, start, head = self.prepare(prompt, states, system_prompt, context_prefix, reserve=max_new_tokens)
        if not head:
            raise ValueError("empty prompt: nothing to generate from")
        eos = self._eos_ids(eos_token_id)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        ids = torch.as_tensor([head], device=self.device)
        out_ids: list[int] = []
        emitted = ""
        ttft = None
        eval_mode = self._eval_mode()
        eval_mode.__enter__()
        try:
            logits, cache = self.forward_ids(ids, layers, start)
            # the cache holds what is read from here on (packed where heads keep uneven numbers of rows)
            width, reads, layers = (0 if layers is None else kv.mean_width(layers)), layers is not None, None
            pos = start + len(head)
            text = ""
            for _ in range(int(max_new_tokens)):
                allowed = guide.allowed(logits.shape[-1]).to(logits.device) if guide is not None else None
                nxt = self._pick(logits[0, -1], out_ids + head, do_sample, temperature, top_k, top_p,
                                 repetition_penalty, gen, allowed)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if nxt in eos:
                    break
                if guide is not None:
                    nxt = guide.advance(nxt)  # the budget may close the output early instead
                    if nxt is None:
                        break
                out_ids.append(nxt)
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                if guide is not None and guide.done:
                    if len(text) > len(emitted):
                        yield text[len(emitted):]
                    emitted = text
                    break
                active = stop if guide is None or guide.constraint.allows_stop(text) else None  # free text only
                cut = _stop_index(text, active)
                if cut is not None:
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    emitted = text[:cut]
                    break
                safe = len(text) - _held_back(text, active)  # a possible start of a stop string waits
                if not text.endswith("\ufffd") and safe > len(emitted):
                    yield text[len(emitted):safe]
                    emitted = text[:safe]
                with self.reading(reads):
                    out = kv.call(
                        self.model,
                        cache=cache,
                        input_ids=torch.as_tensor([[nxt]], device=self.device),
                        position_ids=torch.as_tensor([[pos]], device=self.device),
                        use_cache=True,
                    )
                logits, cache = out.logits, kv.out_cache(out)
                pos += 1
            else:
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            active = stop if guide is None or guide.constraint.allows_stop(text) else None
            if (text != emitted and _stop_index(text, active) is None and len(text) > len(emitted)
                    and not text.endswith("\ufffd")):
                yield text[len(emitted):]  # the held-back tail was no stop string after all
        finally:
            eval_mode.__exit__(None, None, None)
            self._report(usage, self._usage(
                states, width, len(head), new_tokens=len(out_ids), ttft_s=ttft, total_s=time.perf_counter() - t0
            ))

    def _eos_ids(self, eos_token_id: Optional[Union[int, list[int]]]) -> set[int]:
        if eos_token_id is not None:
            return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        ids = set()
        for cand in (self.tokenizer.eos_token_id, getattr(self._base_lm().generation_config, "eos_token_id", None)):
            if isinstance(cand, int):
                ids.add(cand)
            elif isinstance(cand, (list, tuple)):
                ids.update(int(c) for c in cand)
        for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id and i is not None and i >= 0:
                if t in self.tokenizer.get_vocab():
                    ids.add(i)
        return ids

    @staticmethod
    def _pick(logits: torch.Tensor, history: list[int], do_sample: bool, temperature: float, top_k: int,
              top_p: float, repetition_penalty: float, gen: Optional[torch.Generator],
              allowed: Optional[torch.Tensor] = None) -> int:
        """The next token from `logits` (V,): greedy or sampled; `allowed` (V,) bool masks out the rest."""
        logits = logits.float().clone()
        if repetition_penalty != 1.0 and history:
            h = torch.as_tensor(sorted(set(history)), device=logits.device)
            sel = logits[h]
            logits[h] = torch.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
        if allowed is not None:
            if not bool(allowed.any()):
                raise RuntimeError("the grammar allows no token here")
            logits = logits.masked_fill(~allowed, -math.inf)
        if not do_sample:
            return int(torch.argmax(logits))
        if temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        logits = logits / temperature
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = -math.inf
        if top_p < 1.0:
            srt, idx = torch.sort(logits, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = cum - torch.softmax(srt, -1) > top_p
            logits[idx[drop]] = -math.inf
        probs = torch.softmax(logits, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stop: Optional[Sequence[str]]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (not yet safe to show)."""
    if not stop:
        return 0
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _stop_index(text: str, stop: Optional[Sequence[str]]) -> Optional[int]:
    if not stop:
        return None
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None
