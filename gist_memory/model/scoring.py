"""Scoring: log-probabilities of continuations given a prompt and states (one shared prefill per call)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import torch

from gist_memory.model import kv
from gist_memory.model.prompt import Prompt
from gist_memory.model.usage import Usage, check_usage
from gist_memory.state import GistState


class Scoring:
    """Mixin of `GistModel`: `score` and `score_choices`."""

    # ---- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt: Prompt,
        continuation: str,
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        usage: Optional[Usage] = None,
    ) -> float:
        """Summed log-probability of `continuation` as the answer to `prompt` (reading `states` if given).

        `usage`: a `Usage` this call fills (positions read, prompt tokens, time).
        """
        return self.score_choices(prompt, [continuation], states=states, system_prompt=system_prompt,
                                  context_prefix=context_prefix, usage=usage)[0]

    @torch.no_grad()
    def score_choices(
        self,
        prompt: Prompt,
        continuations: Sequence[str],
        states: Optional[Sequence[GistState]] = None,
        system_prompt: Optional[str] = None,
        context_prefix: str = "",
        usage: Optional[Usage] = None,
    ) -> list[float]:
        """Summed log-probabilities of several continuations, sharing one prefill (a batch).

        `usage`: a `Usage` this call fills (positions read, prompt tokens, time).
        """
        check_usage(usage)
        t0 = time.perf_counter()
        if not continuations:
            return []
        layers, start, head = self.prepare(prompt, states, system_prompt, context_prefix)
        conts = [self.encode(c) for c in continuations]
        if any(len(c) == 0 for c in conts):
            raise ValueError("a continuation is empty (no tokens to score)")
        if not head and layers is None:
            raise ValueError("nothing to condition on: empty prompt and no states")
        if len(head) == 0:
            raise ValueError("score needs a prompt before the continuation")
        pad = self._pad_id()
        with self._eval_mode():
            # the prompt is read once; the continuations then run as one batch over its cache
            h_logits, cache = self.forward_ids(torch.as_tensor([head], device=self.device), layers, start)
            first = torch.log_softmax(h_logits[0, -1].float(), -1)
            out = [float(first[c[0]]) for c in conts]
            rest = [c for c in conts if len(c) > 1]
            if rest:
                C = max(len(c) for c in rest) - 1
                ids = torch.full((len(rest), C), pad, dtype=torch.long, device=self.device)
                for i, c in enumerate(rest):
                    ids[i, : len(c) - 1] = torch.as_tensor(c[:-1])
                # states present: the model's own reader; none: the base model, as for the prompt
                logits, _ = self.forward_ids(ids, kv.cache_layers(cache), start + len(head),
                                             adapted=None if layers is not None else False)
                logp = torch.log_softmax(logits.float(), -1)
                j = 0
                for i, c in enumerate(conts):
                    if len(c) > 1:
                        # token t >= 1 of the continuation is predicted at index t-1 of its row
                        tgt = torch.as_tensor(c[1:], device=self.device)
                        out[i] += float(logp[j, torch.arange(len(c) - 1, device=self.device), tgt].sum())
                        j += 1
        self._report(usage, self._usage(states, layers, len(head), total_s=time.perf_counter() - t0))
        return out

    # ---- relevance: which contexts a question is about -------------------------------------------------------
    @torch.no_grad()
    def relevance(self, query: str, contexts: Sequence[GistState | str], system_prompt: Optional[str] = None,
                  batch_size: int = 8) -> list[float]:  # fmt: skip
        """How well each context predicts `query`: the summed log-probability of the query's tokens read right
        after that context alone (a state, or raw text), as the question is read after states.

        A query-likelihood score (the reader itself judges which passage a question is about, without the
        answer): higher means more relevant; scores compare across the contexts of one call (the same query
        tokens are scored each time). Each context is read alone, its rows plus the query's tokens; up to
        `batch_size` contexts share one padded forward (`batch_size=1`: one forward each; the scores agree to
        float rounding).
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("relevance needs a non-empty query")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        q = self.encode(query)
        rows = []
        for i, ctx in enumerate(contexts):
            if isinstance(ctx, GistState):
                layers, start, ids = self.prepare(query, [ctx], system_prompt)
            elif isinstance(ctx, str):
                if not ctx.strip():
                    raise ValueError(f"contexts[{i}] is empty text")
                layers, start, ids = self.prepare(query, None, system_prompt, context_prefix=ctx + "\n\n")
            else:
                raise ValueError(f"contexts[{i}] is a {type(ctx).__name__}, not a GistState or str")
            at = _last_span(ids, q)
            lo, hi = (max(1, at), at + len(q)) if at >= 0 else (1, len(ids))  # not found: the whole suffix
            if hi <= lo:
                raise ValueError("the query has no tokens to score after the context")
            rows.append(_Scored(layers, start, ids, lo, hi))
        out: list[float] = [0.0] * len(rows)
        from gist_memory.model.batching import adapted_reader

        done: set[int] = set()  # rows scored in a padded forward
        with self._eval_mode():
            if batch_size > 1 and not adapted_reader(self):
                # rows that score the same number of final tokens share a padded forward (right-aligned, their
                # scored tokens are the last ones of every row); the others are read one at a time
                groups: dict[int, list[int]] = {}
                for i, r in enumerate(rows):
                    groups.setdefault(r.hi - r.lo, []).append(i)
                for n, idx in groups.items():
                    for b in range(0, len(idx), batch_size):
                        part = idx[b: b + batch_size]
                        if len(part) < 2:
                            continue
                        out_b = self._relevance_batch([rows[i] for i in part], n)
                        for i, v in zip(part, out_b):
                            out[i] = v
                        done.update(part)
            for i, r in enumerate(rows):
                if i not in done:
                    logits, _ = self.forward_ids(torch.as_tensor([r.head], device=self.device), r.layers, r.start)
                    logp = torch.log_softmax(logits[0, r.lo - 1: r.hi - 1].float(), -1)
                    tgt = torch.as_tensor(r.ids[r.lo:r.hi], device=self.device)
                    out[i] = float(logp[torch.arange(r.hi - r.lo, device=self.device), tgt].sum())
        return out

    def _relevance_batch(self, rows: list[_Scored], n: int) -> list[float]:
        """Summed log-probabilities of each row's last `n` tokens, all rows in one padded forward."""
        from gist_memory.model.batching import padded_forward

        for r in rows:
            if r.layers is not None:
                r.layers = kv.uniform_widths(r.layers)
                r.cached = int(r.layers[0][0].shape[2])
        res, _ = padded_forward(self, rows, logits_to_keep=n + 1)
        logp = torch.log_softmax(res.logits[:, :-1].float(), -1)  # (B, n, V): the predictions of the last n ids
        tgt = torch.as_tensor([r.head[-n:] for r in rows], device=self.device)
        return [float(x) for x in logp.gather(-1, tgt[..., None])[..., 0].sum(-1)]

    def focus(self, query: str, contexts: Sequence[GistState | str], keep: Optional[int] = None,
              system_prompt: Optional[str] = None) -> list:  # fmt: skip
        """`contexts` in reading order for `query`: by `relevance`, the most relevant last (next to the question,
        where a reader binds best), and with `keep` only the `keep` most relevant. States and texts are read in
        any order at no cost (each was written alone), so this only changes what the reader sees where.
        Ties keep the given order."""
        ctxs = list(contexts)
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        if len(ctxs) <= 1:
            return ctxs
        return [ctxs[i] for i in reading_order_by_relevance(self.relevance(query, ctxs, system_prompt), keep)]


def reading_order_by_relevance(scores: Sequence[float], keep: Optional[int] = None) -> list[int]:
    """Indices of contexts in reading order for their `relevance` scores: the most relevant last (ties: the
    earlier context later, so a search order's best stays nearest the question), with `keep` only the top ones."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return order if keep is None else order[-keep:]


class _Scored:
    """One context of a `relevance` call: its prepared cache, the ids read after it (up to the query's end) and
    the span [lo, hi) of those ids that is scored."""

    def __init__(self, layers, start: int, ids: Sequence[int], lo: int, hi: int) -> None:  # noqa: ANN001
        self.layers, self.start, self.ids, self.lo, self.hi = layers, start, list(ids), lo, hi
        self.head = self.ids[:hi]
        self.cached = 0 if layers is None else int(layers[0][0].shape[2])


def _last_span(ids: Sequence[int], sub: Sequence[int]) -> int:
    """Start of the last occurrence of `sub` in `ids` (-1 if absent)."""
    n = len(sub)
    for s in range(len(ids) - n, -1, -1):
        if list(ids[s: s + n]) == list(sub):
            return s
    return -1
