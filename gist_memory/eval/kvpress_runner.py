"""The kvpress side of the peer comparison: runs *inside an environment that has kvpress* (it pins
transformers < 5.3, so it cannot share ours) as `python kvpress_runner.py JOB.json OUT.json`.

Self-contained on purpose: it imports only torch, transformers and kvpress (never gist_memory), reads a job
written by `gist_memory.eval.kvpress_peer` and writes plain JSON back. Token ids come in ready-made (our
tokenizer, our chat template), so both environments read exactly the same prompt.

What it does, per press and per passage (query-agnostic, like a gist state: each passage compressed alone, once):
- prefill the passage with the press on (knorm / expected attention drop whole rows per head; KVzip scores by
  context reconstruction and masks rows per head with kvpress's attention patch), keeping on average as many rows
  per head as the passage's gist state keeps positions;
- at question time: the chat template's opening (computed once), then each passage's kept rows moved by RoPE to
  the passage's place in the full-text prompt (a uniform shift keeps every row's relative position), then the
  question and each answer choice, scored by summed log-probability;
- time to first token for the speed queries (splice + question prefill + first pick) and the compression time
  per passage.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _rotate_half(x):  # noqa: ANN001, ANN202
    import torch

    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Runner:
    def __init__(self, job: dict):
        import kvpress  # noqa: F401 - installs kvpress's attention patch (KVzip's masks)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        self.job = job
        dtype = getattr(torch, job.get("dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, attn_implementation="sdpa")
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(job["model"])
        self.layers = self.model.model.layers
        rot = self.model.model.rotary_emb
        self.inv_freq = rot.inv_freq.float()
        self.scaling = float(getattr(rot, "attention_scaling", 1.0))
        self._prefix: dict[tuple, list] = {}

    # ---- compression ---------------------------------------------------------------------------------
    def _press(self, name: str, ratio: float):  # noqa: ANN202
        from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress

        if name == "knorm":
            return KnormPress(compression_ratio=ratio)
        if name == "expected_attention":
            return ExpectedAttentionPress(compression_ratio=ratio)
        if name in ("kvzip", "kvzip_uniform"):
            return KVzipPress(compression_ratio=ratio)
        raise ValueError(f"unknown press {name!r} (knorm, expected_attention, kvzip, kvzip_uniform)")

    def kvzip_prefix(self) -> list[int]:
        """The chat template's opening as KVzip finds it (it reconstructs the context after it)."""
        tok = self.tokenizer
        if tok.chat_template is None:
            return []
        sep = "\n" + "#" * len("dummy context")
        text = tok.apply_chat_template([{"role": "user", "content": "dummy context" + sep}], add_generation_prompt=True,
                                       tokenize=False)
        return tok.encode(text.split(sep)[0].split("dummy context")[0], add_special_tokens=False)

    def compress(self, name: str, ids: list[int], budget: int, prefix: list[int]) -> dict:
        """One passage under one press: its rows per layer (rotated at their own positions), the start position,
        the masked (batch, head, seq) indices for KVzip, rows kept per head on average, and the seconds."""
        import torch
        from transformers import DynamicCache

        n = len(ids)
        budget = max(1, min(int(budget), n))
        kvzip = name in ("kvzip", "kvzip_uniform")
        ratio = max(0.0, 1.0 - (budget + 0.5) / n) if budget < n else 0.0
        if kvzip and budget < n:  # its ratio counts the template opening too: prune as many rows as the others
            ratio = (n - budget) / (len(prefix) + n)
        # KVzip reconstructs the context after the chat template's opening: it gets that opening, and only the
        # passage's rows are kept afterwards
        ctx = (prefix + ids) if kvzip else ids
        start = len(prefix) if kvzip else 0
        cache = DynamicCache()
        press = self._press(name, ratio)
        if kvzip and ratio > 0:
            # KVzip ranks the rows of the whole prefilled context (template opening + passage) together; the opening
            # is protected like its attention sinks, so every pruned row is a passage row and the passage keeps, on
            # average per head, exactly its budget (as the other methods do)
            post = press.compress_post

            def compress_post(model, _post=post, _press=press, _start=start):  # noqa: ANN001, ANN202
                _press.score_val[..., :_start] = _press.score_val.amax() + 2.0
                return _post(model)

            press.compress_post = compress_post
            if name == "kvzip_uniform":  # KVzip's scores, but every layer's head keeps the same number of rows

                def uniform_post(model, _press=press, _start=start, _keep=budget):  # noqa: ANN001, ANN202
                    import torch as _t

                    sv = _press.score_val  # (layers, batch, kv heads, context)
                    for layer in model.model.layers:
                        s = sv[int(layer.self_attn.layer_idx)][0, :, _start:]  # (kv heads, passage)
                        drop = _t.topk(-s, s.shape[1] - _keep, dim=1).indices  # each head's lowest rows
                        h = _t.arange(s.shape[0]).repeat_interleave(drop.shape[1])
                        layer.self_attn.masked_key_indices = (_t.zeros_like(h), h, drop.flatten().cpu() + _start)

                press.compress_post = uniform_post
        t0 = time.perf_counter()
        with torch.no_grad():
            if ratio > 0:
                with press(self.model):
                    self.model.model(input_ids=torch.as_tensor([ctx]), past_key_values=cache, use_cache=True)
            else:
                self.model.model(input_ids=torch.as_tensor([ctx]), past_key_values=cache, use_cache=True)
        secs = time.perf_counter() - t0
        rows, masks = [], []
        for i, layer in enumerate(self.layers):
            k, v = cache.layers[i].keys, cache.layers[i].values
            if kvzip:
                k, v = k[:, :, start:], v[:, :, start:]
                keep = torch.ones(k.shape[1], k.shape[2], dtype=torch.bool)
                mk = getattr(layer.self_attn, "masked_key_indices", None)
                if ratio > 0 and mk is not None:
                    _, h, s = mk
                    sel = s >= start
                    keep[h[sel], s[sel] - start] = False
                layer.self_attn.masked_key_indices = None
                masks.append(keep)
            rows.append((k, v))
        kept = (statistics.mean(float(m.sum()) / m.shape[0] for m in masks) if kvzip else float(rows[0][0].shape[2]))
        return {"rows": rows, "start": start, "masks": masks if kvzip else None, "n": n, "kept": kept, "secs": secs}

    # ---- reading -------------------------------------------------------------------------------------
    def _shift(self, k, delta: int):  # noqa: ANN001, ANN202
        """Keys rotated at position p -> at p + delta (a uniform RoPE shift)."""
        import torch

        if delta == 0:
            return k
        ang = float(delta) * self.inv_freq
        emb = torch.cat((ang, ang))
        cos, sin = emb.cos().to(k.dtype), emb.sin().to(k.dtype)
        return k * cos + _rotate_half(k) * sin

    def _prefix_rows(self, prefix: list[int]) -> list:
        import torch
        from transformers import DynamicCache

        key = tuple(prefix)
        if key not in self._prefix:
            cache = DynamicCache()
            with torch.no_grad():
                self.model.model(input_ids=torch.as_tensor([prefix]), past_key_values=cache, use_cache=True)
            self._prefix[key] = [(cache.layers[i].keys, cache.layers[i].values) for i in range(len(self.layers))]
        return self._prefix[key]

    def context(self, prefix: list[int], parts: list[dict]) -> tuple[list, list, int, float]:
        """Per-layer K/V of [opening, passage rows...], per-layer keep masks (None: keep all), next position,
        and the positions read on average per head."""
        import torch

        pre = self._prefix_rows(prefix)
        pos = len(prefix)
        ks = [[k] for k, _ in pre]
        vs = [[v] for _, v in pre]
        any_mask = any(p["masks"] is not None for p in parts)
        ms = [[torch.ones(k.shape[1], k.shape[2], dtype=torch.bool)] for k, _ in pre] if any_mask else None
        read = float(len(prefix))
        for p in parts:
            delta = pos - p["start"]
            for i, (k, v) in enumerate(p["rows"]):
                ks[i].append(self._shift(k, delta))
                vs[i].append(v)
                if ms is not None:
                    ms[i].append(p["masks"][i] if p["masks"] is not None
                                 else torch.ones(k.shape[1], k.shape[2], dtype=torch.bool))
            pos += p["n"]  # the passage's raw length: the question sits where it sits in the full-text prompt
            read += p["kept"]
        layers = [(torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(ks, vs, strict=True)]
        masks = [torch.cat(m, 1) for m in ms] if ms is not None else None
        return layers, masks, pos, read

    def forward(self, layers, masks, pos: int, ids: list[int]):  # noqa: ANN001, ANN202
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        for i, layer in enumerate(self.layers):
            m = None
            if masks is not None and not bool(masks[i].all()):
                h, s = (~masks[i]).nonzero(as_tuple=True)
                m = (torch.zeros_like(h), h, s)
            layer.self_attn.masked_key_indices = m
        try:
            with torch.no_grad():
                out = self.model(input_ids=torch.as_tensor([ids]), past_key_values=cache, use_cache=True,
                                 position_ids=(pos + torch.arange(len(ids)))[None])
        finally:
            for layer in self.layers:
                layer.self_attn.masked_key_indices = None
        return out.logits[0]

    def score(self, layers, masks, pos: int, suffix: list[int], choices: list[list[int]]) -> list[float]:  # noqa: ANN001
        import torch

        out = []
        for c in choices:
            lg = torch.log_softmax(self.forward(layers, masks, pos, suffix + c).float(), -1)
            at = torch.arange(len(suffix) - 1, len(suffix) + len(c) - 1)
            out.append(float(lg[at, torch.as_tensor(c)].sum()))
        return out


def run(job: dict) -> dict:
    import torch
    import transformers

    r = Runner(job)
    passages = {pid: ids for pid, ids in job["passages"].items()}
    from importlib.metadata import version

    res: dict = {"versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                              "torch": torch.__version__}, "presses": {}}
    full = []
    for q in job.get("speed", []):  # full text in this environment: the reference of the TTFT ratio
        ids = list(q["prefix"])
        for p in q["passages"]:
            ids += passages[p]
        ids += q["suffix"]
        times = []
        for _ in range(int(job.get("repeats", 3)) + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                int(r.model(input_ids=torch.as_tensor([ids])).logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
        full.append(statistics.median(times[1:]))
    res["full_ttft_s"] = full
    for name in job["presses"]:
        got: dict[str, dict] = {}
        for pid, ids in passages.items():
            got[pid] = r.compress(name, ids, job["budgets"][pid], r.kvzip_prefix())
        items = []
        for it in job["items"]:
            parts = [got[p] for p in it["passages"]]
            layers, masks, pos, read = r.context(it["prefix"], parts)
            items.append({"scores": r.score(layers, masks, pos, it["suffix"], it["choices"]),
                          "raw": sum(p["n"] for p in parts), "kept": sum(p["kept"] for p in parts),
                          "positions_read": read + len(it["suffix"])})
        speed = []
        for q in job.get("speed", []):
            parts = [got[p] for p in q["passages"]]
            times = []
            for _ in range(int(job.get("repeats", 3)) + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                layers, masks, pos, read = r.context(q["prefix"], parts)
                lg = r.forward(layers, masks, pos, q["suffix"])
                int(lg[-1].argmax())
                times.append(time.perf_counter() - t0)
            speed.append({"k": len(parts), "ttft_s": statistics.median(times[1:]), "full_ttft_s": full[len(speed)],
                          "positions_read": read + len(q["suffix"]), "raw": sum(p["n"] for p in parts)})
        res["presses"][name] = {
            "items": items, "speed": speed,
            "compress_s": {pid: g["secs"] for pid, g in got.items()},
            "kept": {pid: g["kept"] for pid, g in got.items()},
        }
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: kvpress_runner.py JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    res = run(job)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
