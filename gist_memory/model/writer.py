"""The writer: what is trained, and the switch that confines it to the compression pass.

A gist model is the base causal LM plus a `Writer`:

- `gist_embeddings` (num_gist_tokens, hidden): the input of each gist slot. Gist slots are not vocabulary
  tokens: the tokenizer and the embedding matrix of the base model stay as they are, so the reader's logits
  have the base vocabulary exactly;
- an optional low-rank update (LoRA) of the base model's linear layers, applied through forward hooks only
  while `writing(...)` is active in the current thread/task (a `contextvars` switch), and only on the rows it
  names. Every other call (reading states, answering without states) runs the untouched base weights, so its
  greedy output and log-probs are the base model's, bit for bit.

While writing, a gate says which rows of the batch get the update: `None` = all rows (the gist pass, whose
rows are all gists), or a (B, T) bool tensor (a reference single pass that mixes text and gists).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

_WRITING: contextvars.ContextVar[Optional[tuple[int, Any]]] = contextvars.ContextVar("gist_writer", default=None)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _LoRA(nn.Module):
    """One low-rank update: x -> (x A^T) B^T * scale."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return (x @ a.t()) @ b.t() * self.scale


class Writer(nn.Module):
    """Gist embeddings and an optional LoRA that acts only inside `writing()`.

    Args:
        base: The transformers causal LM (its weights are never changed).
        num_gist_tokens: Distinct gist embeddings.
        r: LoRA rank (0: gist embeddings only).
        alpha: LoRA alpha (scale = alpha / r).
        targets: Names of the linear modules that get an update (those present in the model).
    """

    def __init__(self, base: nn.Module, num_gist_tokens: int, r: int = 0, alpha: float = 32.0,
                 targets: Sequence[str] = LORA_TARGETS):
        super().__init__()
        emb = base.get_input_embeddings()
        hidden = emb.weight.shape[1]
        self.gist_embeddings = nn.Parameter(torch.zeros(num_gist_tokens, hidden, dtype=torch.float32))
        self.r, self.alpha = int(r), float(alpha)
        self.targets = sorted({t for t in targets})
        self.lora = nn.ModuleDict()
        self._handles: list[Any] = []
        with torch.no_grad():
            self._init_gist_rows(emb)
        if self.r > 0:
            decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
            for name, mod in decoder.named_modules():
                if isinstance(mod, nn.Linear) and name.split(".")[-1] in self.targets:
                    key = name.replace(".", "__")
                    self.lora[key] = _LoRA(mod.in_features, mod.out_features, self.r, self.alpha)
                    self._handles.append(mod.register_forward_hook(self._hook(key)))
            if not len(self.lora):
                raise ValueError(f"no linear module named one of {self.targets} in {type(base).__name__}")
        self.to(emb.weight.device)

    def _init_gist_rows(self, emb: nn.Module) -> None:
        """Gist rows start near the mean input embedding (scaled embeddings included), plus a little noise."""
        w = emb.weight
        V = w.shape[0]
        idx = torch.arange(0, V, max(1, V // 4096), device=w.device)
        rows = emb(idx).float()
        mean, std = rows.mean(0), rows.std(0)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(self.gist_embeddings.shape, generator=g).to(w.device) * 0.02
        self.gist_embeddings.copy_(mean + noise * std)

    def _hook(self, key: str):  # noqa: ANN202
        ident = id(self)

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):  # noqa: ANN202
            active = _WRITING.get()
            if active is None or active[0] != ident:
                return None  # reading: the base layer's output, untouched
            gate = active[1]
            x = inputs[0]
            if gate is None:
                return output + self.lora[key](x).to(output.dtype)
            sel = gate.reshape(-1)
            flat_x = x.reshape(-1, x.shape[-1])
            delta = torch.zeros(flat_x.shape[0], output.shape[-1], dtype=output.dtype, device=output.device)
            delta = delta.index_put((sel.nonzero().reshape(-1),), self.lora[key](flat_x[sel]).to(output.dtype))
            return output + delta.reshape(output.shape)

        return hook

    @contextlib.contextmanager
    def writing(self, gate: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Inside: the LoRA acts (on the rows `gate` marks, all rows if None), in this thread/task only."""
        token = _WRITING.set((id(self), gate))
        try:
            yield
        finally:
            _WRITING.reset(token)

    def embed(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(...,) slot indices -> (..., hidden) gist inputs (slots past the last use the last embedding)."""
        idx = slots.clamp(0, self.gist_embeddings.shape[0] - 1)
        return self.gist_embeddings[idx].to(dtype)

    def remove(self) -> None:
        """Detach the hooks from the base model (the model then has no writer)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- serialisation ------------------------------------------------------------------------------
    def tensors(self, lora_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict for safetensors (`gist_embeddings`, `lora.<module>.lora_A/B`)."""
        out = {"gist_embeddings": self.gist_embeddings.detach().float().cpu().contiguous()}
        for key, mod in self.lora.items():
            out[f"lora.{key}.lora_A"] = mod.lora_A.detach().to(lora_dtype).cpu().contiguous()
            out[f"lora.{key}.lora_B"] = mod.lora_B.detach().to(lora_dtype).cpu().contiguous()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
        """Fill from `tensors()` output; shapes and names must match exactly (errors name the difference)."""
        with torch.no_grad():
            g = tensors.get("gist_embeddings")
            if g is None:
                raise ValueError(f"{where}: no gist_embeddings")
            if tuple(g.shape) != tuple(self.gist_embeddings.shape):
                raise ValueError(f"{where}: gist_embeddings {tuple(g.shape)}, this model needs "
                                 f"{tuple(self.gist_embeddings.shape)} (gist count or hidden size differ)")
            self.gist_embeddings.copy_(g.to(self.gist_embeddings))
            want = {f"lora.{k}.{p}" for k in self.lora for p in ("lora_A", "lora_B")}
            have = {k for k in tensors if k.startswith("lora.")}
            if want != have:
                missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
                raise ValueError(f"{where}: LoRA weights do not fit this base model (missing {missing}, "
                                 f"unexpected {extra})")
            for key, mod in self.lora.items():
                for p in ("lora_A", "lora_B"):
                    t = tensors[f"lora.{key}.{p}"]
                    dst = getattr(mod, p)
                    if t.shape != dst.shape:
                        raise ValueError(f"{where}: lora.{key}.{p} is {tuple(t.shape)}, expected {tuple(dst.shape)}")
                    dst.copy_(t.to(dst))

    def spec(self) -> dict[str, Any]:
        """The json description saved beside the tensors."""
        return {"num_gist_tokens": int(self.gist_embeddings.shape[0]), "r": self.r, "alpha": self.alpha,
                "targets": list(self.targets), "scope": "gist rows of the compression pass"}
