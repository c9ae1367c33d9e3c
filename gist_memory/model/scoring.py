"""Scoring: log-probabilities of continuations given a prompt and states (one shared prefill per call)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import torch

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
        S = len(head) + max(len(c) for c in conts)
        pad = self._pad_id()
        ids = torch.full((len(conts), S), pad, dtype=torch.long, device=self.device)
        for i, c in enumerate(conts):
            ids[i, : len(head) + len(c)] = torch.as_tensor(head + c)
        with self._eval_mode():
            logits, _ = self.forward_ids(ids, layers, start)
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for i, c in enumerate(conts):
            # token t of the continuation sits at index len(head)+t, predicted at index len(head)+t-1
            if len(head) == 0:
                raise ValueError("score needs a prompt before the continuation")
            tgt = torch.as_tensor(c, device=self.device)
            pos = len(head) - 1 + torch.arange(len(c), device=self.device)
            out.append(float(logp[i, pos, tgt].sum()))
        self._report(usage, self._usage(states, layers, len(head), total_s=time.perf_counter() - t0))
        return out
