"""Compression: texts -> plans -> gist states.

Pass 1 (`text_pass`) reads each text's raw ids with the base weights; pass 2 keeps rows per the compressor:
`gist` runs the writer (gist slots attend to the text rows and earlier gists; anchors kept raw), `pool+anchors`
mean-pools the rest of each piece (training-free). Long texts are read window by window, in chunks.
`forward_layout` is the single-pass reference over a whole layout that training and the invariant tests use.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from gist_memory.config import RECALL_ANCHOR_POLICIES
from gist_memory.layout import KIND_GIST_TOKEN, Layout, Segment, build_writer_batch, float_mask, window_starts
from gist_memory.model import kv
from gist_memory.model.plan import Plan, finish_plan, make_plan
from gist_memory.state import KIND_ANCHOR, KIND_GIST, KIND_POOL, GistState
from gist_memory.state.gist_state import text_hash
from gist_memory.text.split import normalize_text

#: What the `recall` anchor policy asks between the text and its teacher-forced copy.
RECALL_PROMPT = "\n\nRepeat the text above exactly.\n\n"


def _recall_from_heads(heads: torch.Tensor) -> np.ndarray:
    """Per-token recall score from per-head scores (L, H, N): the largest over heads, averaged over layers."""
    if heads.shape[-1] == 0:
        return np.zeros(0, dtype=np.float64)
    return heads.amax(dim=1).mean(dim=0).double().numpy()


class Compressing:
    """Mixin of `GistModel`: `plan`, `compress` and the two passes behind it."""

    def normalize(self, text: str) -> str:
        """The normalisation applied before hashing and compressing."""
        return normalize_text(text)

    def state_key(self, text: str) -> str:
        """Content key of the state `text` would get from this model."""
        return hashlib.sha256(f"{text_hash(self.normalize(text))}:{self.fingerprint}".encode()).hexdigest()

    # ---- compression -------------------------------------------------------------------------------
    def plan(self, text: str) -> Plan:
        """How `text` would be compressed (pieces, anchors, rows per piece). Runs no model, except for the
        `surprisal` anchor policies, which read the text once to rank its words (`compress` reuses its own
        first pass for that instead)."""
        p = self._provisional_plan(text)
        if not p.scored:
            with torch.no_grad():
                p = self._finish(p)
        return p

    def _finish(self, plan: Plan, hidden: Optional[torch.Tensor] = None) -> Plan:
        """The final plan of a provisional one: its words ranked by the anchor policy's scores (surprisal from
        `hidden`, the first pass's final hidden states, when given), plus per-head scores with `head_anchors`."""
        ids = plan.ids.tolist()
        heads = None
        if self.config.anchors in RECALL_ANCHOR_POLICIES:
            heads = self.token_recall_heads(ids)
            scores = _recall_from_heads(heads)
        elif hidden is not None:
            scores = self._surprisal(hidden, ids)
        else:
            scores = self.token_surprisal(ids)
        out = finish_plan(plan, self.config, self.splitter, scores)
        if self.config.head_anchors and heads is not None:
            out.head_scores = heads.float().cpu().numpy()
        return out

    def _provisional_plan(self, text: str) -> Plan:
        norm = self.normalize(text)
        if not norm:
            raise ValueError("cannot compress an empty or whitespace-only text")
        return make_plan(norm, self.tokenizer, self.config, self.splitter)

    @torch.no_grad()
    def token_surprisal(self, ids: Sequence[int]) -> np.ndarray:
        """Per token, -log p(token | the tokens before it) under the base model (the first token: the mean of
        the others), read in chunks of `chunk_tokens` with a cache."""
        ids = [int(i) for i in ids]
        past, hidden = None, []
        for c0 in range(0, len(ids), self.chunk_tokens):
            c1 = min(len(ids), c0 + self.chunk_tokens)
            x = torch.as_tensor([ids[c0:c1]], device=self.device)
            pos = torch.arange(c0, c1, device=self.device)[None]
            out = kv.call(self.model.get_decoder(), cache=past, input_ids=x, position_ids=pos, use_cache=True)
            past = kv.out_cache(out)
            hidden.append(out.last_hidden_state[0])
        return self._surprisal(torch.cat(hidden), ids)

    @torch.no_grad()
    def token_recall(self, ids: Sequence[int]) -> np.ndarray:
        """Per token, how much the base model needs it to reproduce the text: the text is read, then an instruction
        to repeat it, then the text again (teacher-forced); a token's score is the largest attention any head pays
        it from the repeated copy, averaged over layers. (KVzip scores each head's rows this way and keeps the
        best per head; here one ranking serves every layer and head; `token_recall_heads` gives the per-head
        scores that `head_anchors` keeps by.)"""
        return _recall_from_heads(self.token_recall_heads(ids))

    @torch.no_grad()
    def token_recall_heads(self, ids: Sequence[int]) -> torch.Tensor:
        """(L, H_kv, N) float32: per layer and key/value head, the largest attention any of its query heads pays
        each token from the teacher-forced copy of the text (see `token_recall`)."""
        ids = [int(i) for i in ids]
        n = len(ids)
        dec = self.model.get_decoder()
        cfg = self.model.config
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        if n < 2:
            return torch.zeros(len(dec.layers), n_kv, n, dtype=torch.float32)
        pre = self._template_head()  # read after the chat template's opening, as the reader places states (and
        # so the opening, not the text's first token, takes the attention sink's share)
        rep = self.encode(RECALL_PROMPT)
        seq = pre + ids + rep + ids[:-1]
        t0 = len(pre)
        q0 = t0 + n + len(rep)  # the copy's queries: each predicts the next token of the text
        x = torch.as_tensor([seq], device=self.device)
        pos = torch.arange(len(seq), device=self.device)
        out = kv.call(dec, input_ids=x, position_ids=pos[None], use_cache=True, output_hidden_states=True)
        layers = kv.cache_layers(kv.out_cache(out))
        hidden = out.hidden_states  # hidden[l] is layer l's input
        heads = []
        causal = pos[q0 - 1 :, None] >= pos[None, :]  # the copy's queries (and the one before) over every key
        for li, layer in enumerate(dec.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(hidden[li][:, q0 - 1 :])
            D = int(getattr(attn, "head_dim", layers[li][0].shape[-1]))
            q = attn.q_proj(h).view(1, h.shape[1], -1, D)
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
            q = kv.rotate(q.transpose(1, 2), pos[q0 - 1 :], self.rope)  # (1, H, Tq, D) at their positions
            k = layers[li][0]  # (1, Hkv, T, D), already rotated
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            logits = (q.float() @ k.float().transpose(-1, -2)) * float(getattr(attn, "scaling", D**-0.5))
            p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            ph = p[0, :, :, t0 : t0 + n].amax(dim=1)  # (H, n): each query head's largest attention per token
            heads.append(ph.view(k.shape[1] // group, group, n).amax(dim=1).cpu())
        return torch.stack(heads)

    def token_scores(self, ids: Sequence[int]) -> np.ndarray:
        """The per-token scores the config's anchor policy ranks words by (`surprisal` or `recall`)."""
        if self.config.anchors in RECALL_ANCHOR_POLICIES:
            return self.token_recall(ids)
        return self.token_surprisal(ids)

    def _surprisal(self, hidden: torch.Tensor, ids: Sequence[int]) -> np.ndarray:
        """Surprisal per token from the decoder's final hidden states (N, H) of the same tokens."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        n = len(ids)
        out = np.zeros(n, dtype=np.float64)
        tgt = torch.as_tensor(list(ids), device=hidden.device)
        for c0 in range(0, n - 1, 256):
            c1 = min(n - 1, c0 + 256)
            logits = head(hidden[c0:c1].detach()).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[c0 + 1 : c1 + 1, None])[:, 0]
            out[c0 + 1 : c1 + 1] = (-lp).cpu().double().numpy()
        out[0] = out[1:].mean() if n > 1 else 0.0
        return out

    @torch.no_grad()
    def compress(
        self, texts: Union[str, Sequence[str]], batch_size: int = 8, device_out: Optional[str] = "cpu"
    ) -> list[GistState]:
        """Compress texts into gist states, one per text (batched; long texts window by window).

        Args:
            texts: Passages (a single str is accepted too).
            batch_size: Passages per forward pass.
            device_out: Where the returned states live (None: the model's device).

        Raises:
            ValueError: An empty/whitespace-only text.
        """
        if isinstance(texts, str):
            texts = [texts]
        with self._eval_mode():
            return self.compress_with_grad(texts, batch_size=batch_size, device_out=device_out)

    def compress_with_grad(
        self, texts: Sequence[str], batch_size: int = 8, device_out: Optional[str] = None,
        plans: Optional[Sequence[Plan]] = None,
    ) -> list[GistState]:
        """`compress` without `no_grad`: gradients flow into the gist rows (used by training).

        `plans` (from `plan`) may be given to skip re-planning the same texts.
        """
        plans = list(plans) if plans is not None else [self._provisional_plan(t) for t in texts]
        results = self._compress_plans(plans, batch_size)  # finishes provisional plans in place
        return self._states(plans, results, device_out)

    def compress_for_training(
        self, plans: Sequence[Plan], batch_size: int = 64
    ) -> tuple[list[GistState], list[GistState]]:
        """(compressed states with gradients, uncompressed twins) sharing one text pass.

        The twin of a text keeps every raw row the base model computed for it (ratio 1.0): reading it is what
        reading the full text would give, so it is the teacher that the compressed state is trained to match.
        """
        plans = list(plans)
        full: list = [None] * len(plans)
        results = self._compress_plans(plans, batch_size, full=full)
        states = self._states(plans, results, None)
        twins = self._states(plans, full, None)
        return states, twins

    def _states(self, plans: Sequence[Plan], results: Sequence, device_out: Optional[str]) -> list[GistState]:
        fp = self.fingerprint
        states = []
        for plan, (keys, values, positions, kinds, span) in zip(plans, results):
            st = GistState(
                keys=keys,
                values=values,
                positions=positions.to(torch.int64),
                kinds=kinds.to(torch.uint8),
                span=int(span),
                num_tokens=plan.num_tokens,
                sentence_spans=plan.char_spans,
                text_hash=text_hash(plan.text),
                model_fingerprint=fp,
                text=plan.text,
                meta={"model_name": self.name, "compressor": self.config.compressor},
            )
            states.append(st.to(device_out) if device_out is not None else st)
        return states

    def segment(self, plan: Plan) -> Segment:
        """The layout `Segment` of a plan (ids, pieces, gists per piece, anchors)."""
        return Segment(ids=plan.ids.tolist(), pieces=list(plan.pieces), n_gists=list(plan.n_other),
                       anchors=plan.anchors.tolist())

    def _compress_plans(self, plans: list[Plan], batch_size: int, full: Optional[list] = None) -> list:
        """Per plan (keys, values, positions, kinds, span) in plan order; `full` (a list as long as `plans`)
        receives the same for every raw row (the uncompressed twin). Provisional plans (a `surprisal` anchor
        policy) are replaced in `plans` by their final ones, ranked from the first pass's own reading."""
        results: list = [None] * len(plans)
        W = int(self.config.window_tokens)
        short = [i for i, p in enumerate(plans) if p.num_tokens <= min(self.chunk_tokens, W)]
        long_ = [i for i, p in enumerate(plans) if p.num_tokens > min(self.chunk_tokens, W)]
        short.sort(key=lambda i: plans[i].num_tokens)  # similar lengths share a batch: less padding
        for b0 in range(0, len(short), batch_size):
            idx = short[b0 : b0 + batch_size]
            score = [i for i in idx if not plans[i].scored]
            with torch.no_grad():
                text, hidden = self._text_pass([plans[i].ids.tolist() for i in idx], want_hidden=bool(score))
                for b, i in enumerate(idx):
                    if not plans[i].scored:
                        plans[i] = self._finish(plans[i], hidden[b, : plans[i].num_tokens] if hidden is not None
                                                else None)
            segs = [self.segment(plans[i]) for i in idx]
            for b, (i, res) in enumerate(zip(idx, self._keep(plans, idx, segs, text))):
                results[i] = self._head_anchor_rows(plans[i], res, [(k[b : b + 1], v[b : b + 1]) for k, v in text])
            if full is not None:
                for b, i in enumerate(idx):
                    full[i] = self._all_rows([(k[b : b + 1], v[b : b + 1]) for k, v in text], plans[i].num_tokens)
        for i in long_:
            if not plans[i].scored:
                with torch.no_grad():
                    plans[i] = self._finish(plans[i])
            seg = self.segment(plans[i])
            with torch.no_grad():
                text = self._text_pass_windows(seg)
            if self.config.compressor == "gist":
                results[i] = self._gist_rows_windows(seg, text)
            else:
                results[i] = self._keep(plans, [i], [seg], text)[0]
            results[i] = self._head_anchor_rows(plans[i], results[i], text)
            if full is not None:
                full[i] = self._all_rows(text, plans[i].num_tokens)
        return results

    def _head_anchor_rows(self, plan: Plan, res: tuple, text) -> tuple:  # noqa: ANN001
        """With `head_anchors`: the shared anchor rows of `res` (K, V, positions, kinds, span) replaced by each
        layer's heads' own best tokens (as many per head as the plan keeps anchors), taken from the text pass
        `text` (per layer (1, H, >= N, D)); positions become (L, H, T). Rows: the anchors of each head in text
        order, then the other rows as they were. Otherwise `res` unchanged."""
        if not self.config.head_anchors:
            return res
        K, V, pos, kinds, span = res
        A = int((kinds == KIND_ANCHOR).sum())
        if A == 0:
            return res
        if plan.head_scores is None:  # a plan made elsewhere (e.g. a device bundle's): score its heads here
            plan.head_scores = self.token_recall_heads(plan.ids.tolist()).numpy()
        n = plan.num_tokens
        TK = torch.stack([k[0, :, :n] for k, _ in text])  # (L, H, n, D)
        TV = torch.stack([v[0, :, :n] for _, v in text])
        scores = torch.as_tensor(plan.head_scores, device=TK.device)[:, :, :n].float()
        S = A - int(round(A * float(self.config.head_anchor_fraction)))  # rows shared by every head
        rule = plan.rule_anchors
        if self.config.anchors != "recall" and rule is not None:  # the rule's words (names, numbers) in every head
            keep = np.flatnonzero(plan.anchors[:n] & rule[:n])
            S = max(S, len(keep))
        else:
            keep = np.zeros(0, dtype=np.int64)
        if S:  # the plan's anchor tokens with the best recall score, in every head; each head then picks the rest
            cand = torch.as_tensor(np.flatnonzero(plan.anchors[:n]), device=TK.device)
            tok = scores.amax(dim=1).mean(dim=0)[cand]
            tok[torch.isin(cand, torch.as_tensor(keep, device=TK.device))] = float("inf")
            shared = cand[tok.topk(min(S, len(cand))).indices]
            scores = scores.clone()
            scores[:, :, shared] = float("inf")
        top = self._head_picks(scores, A)  # (L, H, W) token indices in text order, -1 where a head keeps fewer
        real = top >= 0
        idx = top.clamp(min=0)[..., None]
        ak = TK.gather(2, idx.expand(-1, -1, -1, TK.shape[-1])) * real[..., None]
        av = TV.gather(2, idx.expand(-1, -1, -1, TV.shape[-1])) * real[..., None]
        W = int(top.shape[-1])
        other = kinds != KIND_ANCHOR
        L, H = K.shape[:2]
        rest_pos = pos[other].to(top.device)
        new_pos = torch.cat([top, rest_pos.expand(L, H, -1) if rest_pos.dim() == 1 else rest_pos], dim=-1)
        new_kinds = torch.cat([torch.full((W,), KIND_ANCHOR, dtype=kinds.dtype, device=kinds.device), kinds[other]])
        return (torch.cat([ak.to(K.dtype), K[:, :, other]], 2), torch.cat([av.to(V.dtype), V[:, :, other]], 2),
                new_pos, new_kinds, span)

    def _head_picks(self, scores: torch.Tensor, A: int) -> torch.Tensor:
        """(L, H, W) token indices each layer's head keeps, in text order, from per-head scores (L, H, n).

        `even`: the top A of every head (W = A). `layer` / `global`: the top A * H of each layer's heads together /
        A * H * L of all heads, no head over `GistConfig.head_cap()` * A; heads that keep fewer are padded with -1 up to
        the widest head (W). `depth`: the `global` ranking decides how many rows each layer gets, and that layer's
        heads share them evenly (each its own top A_l), so only whole layers differ in width."""
        L, H, n = scores.shape
        A = min(A, n)
        budget = self.config.head_budget
        if budget == "even" or A == 0:
            return scores.topk(A, dim=-1).indices.sort(dim=-1).values
        cap = min(n, max(A, int(round(self.config.head_cap() * A))))
        ranked = scores.topk(cap, dim=-1)  # each head's best `cap` tokens: no head can take more
        flat = ranked.values.reshape(L, -1) if budget == "layer" else ranked.values.reshape(1, -1)
        take = torch.zeros_like(flat, dtype=torch.bool)
        take.scatter_(1, flat.topk(A * H * (1 if budget == "layer" else L), dim=-1).indices, True)
        take = take.reshape(L, H, cap)
        if budget == "depth":
            counts = _split_evenly(take.sum(dim=(1, 2)).tolist(), H, A * L, cap)  # rows per head of each layer
            slot = torch.arange(cap, device=take.device)
            take = (slot[None, :] < torch.as_tensor(counts, device=take.device)[:, None])[:, None, :].expand(L, H, cap)
        W = max(1, int(take.sum(-1).max()))
        tok = torch.where(take, ranked.indices, torch.full_like(ranked.indices, n))  # not taken -> n, sorts last
        tok = tok.sort(dim=-1).values[..., :W]
        return torch.where(tok < n, tok, torch.full_like(tok, -1))

    def _all_rows(self, text, n: int) -> tuple:  # noqa: ANN001
        K = torch.stack([k[0, :, :n] for k, _ in text])  # (L, H, n, D)
        V = torch.stack([v[0, :, :n] for _, v in text])
        pos = torch.arange(n, device=K.device)
        return K, V, pos, torch.full_like(pos, KIND_ANCHOR), n

    def text_pass(self, rows: Sequence[Sequence[int]], start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pass 1: the base model reads raw ids causally (right-padded batch, positions from `start`).

        Returns per layer (keys, values), each (B, H, N, D), N the longest row. Rows never see their padding.
        """
        return self._text_pass(rows, start)[0]

    def write_head(self) -> list[int]:
        """Ids the writer reads before every text and then drops (`GistConfig.write_head`; [] for `none`).

        `template`: the prompt head the reader puts before the states (the chat template's opening with its
        default system prompt; a base model's BOS), so a text's raw rows are the rows the reader would have cached
        with the text in its prompt, and the text's first token is not read as the start of a sequence."""
        return [] if self.config.write_head == "none" else self._template_head()

    def _template_head(self) -> list[int]:
        """Ids of the prompt head the reader puts before states (the chat template's opening), rendered once."""
        head = getattr(self, "_template_head_ids", None)
        if head is None:
            head = self._template_head_ids = list(self.template_ids("")[0])
        return head

    def _head_cache(self, batch: int, start: int):  # noqa: ANN202 - a DynamicCache, or None without a head
        """The write head's rows as a cache for `batch` rows whose text starts at `start` (the head just before
        it; at negative positions when start is 0: RoPE is relative). The head is read once per device and dtype
        (the text pass runs the base weights only) and re-rotated to where each batch needs it."""
        head = self.write_head()
        if not head:
            return None
        memo = getattr(self, "_write_head_rows", None)
        if memo is None:
            memo = self._write_head_rows = {}
        key = (str(self.device), str(self.dtype))
        if key not in memo:
            x = torch.as_tensor([head], device=self.device)
            with torch.no_grad():
                out = self.model.get_decoder()(input_ids=x, position_ids=torch.arange(len(head), device=self.device)[None],
                                               use_cache=True)  # fmt: skip
            memo[key] = [(k.detach(), v.detach()) for k, v in kv.cache_layers(kv.out_cache(out))]
        delta = start - len(head)
        return kv.cache_from_layers([(kv.rotate(k, delta, self.rope).expand(batch, -1, -1, -1).contiguous(),
                                      v.expand(batch, -1, -1, -1).contiguous()) for k, v in memo[key]])  # fmt: skip

    def _text_pass(self, rows: Sequence[Sequence[int]], start: int = 0, want_hidden: bool = False) -> tuple:
        """`text_pass` plus, if asked, the decoder's final hidden states (B, N, hidden) (else None)."""
        N = max(len(r) for r in rows)
        ids = torch.full((len(rows), N), self._pad_id(), dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        pos = (start + torch.arange(N, device=self.device))[None].expand(len(rows), -1)
        cache = self._head_cache(len(rows), start)
        out = kv.call(self.model.get_decoder(), cache=cache, input_ids=ids, position_ids=pos, use_cache=True)
        layers = kv.cache_layers(kv.out_cache(out))
        P = len(self.write_head())
        if P:
            layers = kv.with_key_mask([(k[:, :, P:], v[:, :, P:]) for k, v in layers], None)
        return layers, (out.last_hidden_state if want_hidden else None)

    def _text_pass_windows(self, seg: Segment) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pass 1 for a long text: each visibility window read alone (positions continue), in exact chunks."""
        ids = list(seg.ids)
        starts = window_starts(seg, self.config.window_tokens) + [len(ids)]
        ks: list[list[torch.Tensor]] = []
        vs: list[list[torch.Tensor]] = []
        for w0, w1 in zip(starts[:-1], starts[1:]):
            past = self._head_cache(1, w0)  # the head before every window (each window is read as if alone)
            P = len(self.write_head())
            for c0 in range(w0, w1, self.chunk_tokens):
                c1 = min(w1, c0 + self.chunk_tokens)
                x = torch.as_tensor([ids[c0:c1]], device=self.device)
                pos = torch.arange(c0, c1, device=self.device)[None]
                out = kv.call(self.model.get_decoder(), cache=past, input_ids=x, position_ids=pos, use_cache=True)
                past = kv.out_cache(out)
            layers = [(k[:, :, P:], v[:, :, P:]) for k, v in kv.cache_layers(past)]
            if not ks:
                ks, vs = [[] for _ in layers], [[] for _ in layers]
            for li, (k, v) in enumerate(layers):
                ks[li].append(k)
                vs[li].append(v)
        return [(torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(ks, vs)]

    def _keep(self, plans: list[Plan], idx: list[int], segs: list[Segment], text) -> list:  # noqa: ANN001
        if self.config.compressor == "gist":
            return self._gist_rows(segs, text)
        return [self._pool_rows(plans[i], [(k[b : b + 1], v[b : b + 1]) for k, v in text])
                for b, i in enumerate(idx)]

    def _gist_rows_windows(self, seg: Segment, text) -> tuple:  # noqa: ANN001
        """Pass 2 for a long text, one visibility window at a time (memory linear in length, not quadratic)."""
        starts = window_starts(seg, self.config.window_tokens) + [len(seg.ids)]
        parts = []
        for w0, w1 in zip(starts[:-1], starts[1:]):
            pieces = [(s - w0, e - w0) for s, e in seg.pieces if w0 <= s < w1]
            n_gists = [g for (s, _), g in zip(seg.pieces, seg.n_gists) if w0 <= s < w1]
            anchors = list(seg.anchors[w0:w1]) if seg.anchors is not None else None
            sub = Segment(ids=list(seg.ids[w0:w1]), pieces=pieces, n_gists=n_gists, anchors=anchors)
            parts.append(self._gist_rows([sub], [(k[:, :, w0:w1], v[:, :, w0:w1]) for k, v in text], offset=w0)[0])
        K = torch.cat([p[0] for p in parts], 2)
        V = torch.cat([p[1] for p in parts], 2)
        return K, V, torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]), len(seg.ids)

    def _gist_rows(self, segs: list[Segment], text, offset: int = 0) -> list:  # noqa: ANN001
        """Pass 2 (the writer): gist slots attend to the text rows and earlier gists; anchors kept raw.

        `offset`: position of the segments' first token (a window of a long text); text rows are already there.
        """
        assert self.writer is not None
        dev = self.device
        wb = build_writer_batch(segs, self._pad_id(), self.config.window_tokens, device=dev)
        N = wb.text_ids.shape[1]
        text = [(k[:, :, :N], v[:, :, :N]) for k, v in text]
        G = wb.gist_slot.shape[1]
        gist_k = gist_v = None
        if G:
            mask = float_mask(wb.gist_allowed(), self._mask_dtype())
            embeds = self.writer.embed(wb.gist_slot, self.dtype)
            cache = kv.cache_from_layers(text)
            with self.writer.writing():
                out = kv.call(self.model.get_decoder(), cache=cache, inputs_embeds=embeds, attention_mask=mask,
                              position_ids=wb.gist_pos + offset, use_cache=True)
            layers = kv.cache_layers(kv.out_cache(out))
            gist_k = torch.stack([k[:, :, N:] for k, _ in layers], 1)  # (B, L, H, G, D)
            gist_v = torch.stack([v[:, :, N:] for _, v in layers], 1)
        text_k = torch.stack([k for k, _ in text], 1)  # (B, L, H, N, D)
        text_v = torch.stack([v for _, v in text], 1)
        res = []
        for b, s in enumerate(segs):
            a = torch.nonzero(wb.anchors[b], as_tuple=False).reshape(-1)
            g = torch.nonzero(wb.gist_valid[b], as_tuple=False).reshape(-1)
            ks, vs = [text_k[b][:, :, a]], [text_v[b][:, :, a]]
            if gist_k is not None:
                ks.append(gist_k[b][:, :, g])
                vs.append(gist_v[b][:, :, g])
            pos = torch.cat([a, wb.gist_pos[b, g]]) + offset
            kinds = torch.cat([torch.full_like(a, KIND_ANCHOR), torch.full_like(g, KIND_GIST)])
            order = torch.argsort(pos * 2 + (kinds == KIND_GIST).long(), stable=True)
            K, V = torch.cat(ks, 2)[:, :, order], torch.cat(vs, 2)[:, :, order]
            res.append((K, V, pos[order], kinds[order], len(s.ids) + offset))
        return res

    def _pool_rows(self, plan: Plan, text) -> tuple:  # noqa: ANN001
        """Training-free: anchors kept raw, the rest of each piece mean-pooled (keys un-rotated, averaged,
        re-rotated to the group's mean position)."""
        dev = self.device
        n = plan.num_tokens
        K = torch.stack([k[0, :, :n] for k, _ in text])  # (L, H, n, D)
        V = torch.stack([v[0, :, :n] for _, v in text])
        groups = np.empty(n, dtype=np.int64)
        row_kind, nxt = [], 0
        for (s, e), n_pool in zip(plan.pieces, plan.n_other):
            anc = plan.anchors[s:e]
            rest = np.flatnonzero(~anc)
            if len(rest):
                g = (np.arange(len(rest)) * n_pool) // len(rest)
                groups[s + rest] = nxt + g
                row_kind += [KIND_POOL] * n_pool
                nxt += n_pool
            for j in np.flatnonzero(anc):
                groups[s + j] = nxt
                row_kind.append(KIND_ANCHOR)
                nxt += 1
        g = torch.as_tensor(groups, device=dev)
        counts = torch.bincount(g, minlength=nxt).clamp_min(1)
        tok_pos = torch.arange(n, device=dev)
        K0 = kv.rotate(K, -tok_pos, self.rope)
        Ksum = torch.zeros(K.shape[0], K.shape[1], nxt, K.shape[3], dtype=torch.float32, device=dev)
        Vsum = torch.zeros(V.shape[0], V.shape[1], nxt, V.shape[3], dtype=torch.float32, device=dev)
        Ksum.index_add_(2, g, K0.float())
        Vsum.index_add_(2, g, V.float())
        gpos = torch.zeros(nxt, dtype=torch.float32, device=dev).index_add_(0, g, tok_pos.float())
        gpos = torch.round(gpos / counts).long()
        Kp = (Ksum / counts[None, None, :, None]).to(K.dtype)
        Vp = (Vsum / counts[None, None, :, None]).to(V.dtype)
        Kp = kv.rotate(Kp, gpos, self.rope)
        order = torch.argsort(gpos, stable=True)
        kinds = torch.as_tensor(row_kind, device=dev)[order]
        return Kp[:, :, order], Vp[:, :, order], gpos[order], kinds, n

    def forward_layout(self, lay: Layout) -> torch.Tensor:
        """Logits of the reference single pass over a `build_layout` batch (text, gists, tail in one forward).

        The writer acts on the gist rows only; text and tail rows run the base weights. Compressing each segment
        alone and continuing from its spliced state gives the same tail logits (the invariant tests pin).
        """
        emb = self.model.get_input_embeddings()(lay.input_ids.clamp_min(0))
        is_gist = lay.kind == KIND_GIST_TOKEN
        if is_gist.any():
            if self.writer is None:
                raise ValueError("this layout has gist rows but the model has no writer")
            g = self.writer.embed(lay.gist_slot.clamp_min(0), emb.dtype)
            emb = torch.where(is_gist[..., None], g, emb)
        mask = lay.attention_mask(self._mask_dtype())
        ctx = self.writer.writing(gate=is_gist) if self.writer is not None else contextlib.nullcontext()
        with ctx:
            out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=lay.position_ids)
        return out.logits


def _split_evenly(layer_rows: list, heads: int, total: int, cap: int) -> list:
    """Rows per head of each layer: each layer's share of `total` (rows per head summed over layers) in proportion to
    `layer_rows` (what a ranking over all heads gave the layer), rounded by largest remainder so the shares add up
    to `total` exactly, none above `cap`."""
    want = [r / heads for r in layer_rows]
    scale = total / max(1e-9, sum(want))
    want = [min(float(cap), w * scale) for w in want]
    out = [int(w) for w in want]
    left = total - sum(out)
    order = sorted(range(len(want)), key=lambda i: want[i] - out[i], reverse=True)
    while left > 0 and any(o < cap for o in out):
        for i in order:
            if left > 0 and out[i] < cap:
                out[i] += 1
                left -= 1
    return out
