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
