"""Apply, stack and remove LoRAs on a loaded transformer without ever reloading it.

Two ways to apply a patch, chosen per LoRA (`mode`):
- "fly" (the default, "auto"): a low-rank branch runs next to the layer, y = layer(x) + x D^T U^T, with every
  LoRA on that layer concatenated into one pair (D = [D1; D2], U = [s1 U1, s2 U2]), so stacking costs one pair of
  thin matmuls per layer. The branch is a child module `qil_lora` holding non-persistent buffers plus a forward
  hook: the state dict keys do not change, `.to()` moves it, and block swap streams it with its block. Full
  deltas of a Linear ride in the same branch. Quantised weights (fp8, INT8/ConvRot, MXFP8, NVFP4) stay
  untouched, so the LoRA keeps full precision (bench/bench_lora.py measures it: merging into fp8 loses most of
  a small LoRA to fp8 rounding), and the layer's own kernels keep running.
- "merge": the patched weight W + sum(s U D) is computed in fp32 and rounded once into the weight's dtype (fp8
  weights are dequantised and requantised with a new per-tensor scale; the other quantised formats always get
  the branch); no per-step cost, but memory for the merged copies while the originals are kept.
Norm and embedding weights (full deltas only) are always merged. Merging swaps `param.data` for a new tensor
and keeps the original tensor object, and removal points the parameter back at it: the base is restored bit
for bit and never reloaded (the original follows the module if it moved to another device meanwhile).

Any change (add, remove, strength) restores the base and re-applies the remaining LoRAs, so the result never
depends on the order of changes. Change LoRAs between runs, not while a pipeline runs (placements capture the
tensors they stream when a run starts).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ...errors import InputError
from .lora import LoraFile, LoraPatch, PathLike, module_table, read_lora
from .quant import Fp8Linear, is_fp8, quantize_tensor_fp8

logger = logging.getLogger(__name__)

MODES = ("auto", "fly", "merge")
STACK_ATTR = "qil_lora_stack"
BRANCH = "qil_lora"
_ids = itertools.count(1)


class LoraBranch(nn.Module):
    """The on-the-fly part of every LoRA on one layer: x -> x D^T U^T (+ x dW^T + db); buffers not persistent."""

    down: Tensor | None
    up: Tensor | None
    weight_delta: Tensor | None
    bias_delta: Tensor | None

    def __init__(
        self, down: Tensor | None, up: Tensor | None, weight_delta: Tensor | None, bias_delta: Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("down", down, persistent=False)  # (R, in), every LoRA's rows stacked
        self.register_buffer("up", up, persistent=False)  # (out, R), strength x scale folded in
        self.register_buffer("weight_delta", weight_delta, persistent=False)  # (out, in)
        self.register_buffer("bias_delta", bias_delta, persistent=False)  # (out,)

    @staticmethod
    def _on(t: Tensor, x: Tensor) -> Tensor:
        return t if t.device == x.device and t.dtype == x.dtype else t.to(x.device, x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> the output delta (..., out) in x's dtype."""
        out: Tensor | None = None
        if self.down is not None:
            assert self.up is not None
            out = F.linear(F.linear(x, self._on(self.down, x)), self._on(self.up, x))
        if self.weight_delta is not None:
            bias = None if self.bias_delta is None else self._on(self.bias_delta, x)
            dense = F.linear(x, self._on(self.weight_delta, x), bias)
            out = dense if out is None else out + dense
        elif self.bias_delta is not None:
            out = self._on(self.bias_delta, x) if out is None else out + self._on(self.bias_delta, x)
        assert out is not None
        return out


def _add_branch(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    return output + getattr(module, BRANCH)(args[0])


@dataclass(eq=False)
class ActiveLora:
    """One LoRA on the stack: the file's patches, its strength and how it is applied."""

    lora: LoraFile
    strength: float
    mode: str
    id: int = field(default_factory=lambda: next(_ids))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Fp8Linear))


def _resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    return "fly" if mode == "auto" else mode


class LoraStack:
    """The LoRAs applied to one transformer, and the bookkeeping to take them off exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entries: list[ActiveLora] = []
        self._hooks: list[RemovableHandle] = []
        self._branched: list[nn.Module] = []
        self._backups: list[tuple[nn.Module, str, bool, Tensor]] = []  # (owner, attr, is_param, original)

    # -- public ----------------------------------------------------------------------------------------------
    def add(self, lora: LoraFile, strength: float, mode: str = "auto") -> ActiveLora:
        """Put a LoRA on the stack and re-apply the stack."""
        return self.add_many([(lora, strength)], mode)[0]

    def add_many(self, loras: Sequence[tuple[LoraFile, float]], mode: str = "auto") -> list[ActiveLora]:
        """Put several LoRAs on the stack and re-apply it once; on an error none of them stays."""
        new = [ActiveLora(lora, _check_strength(s), _resolve_mode(mode)) for lora, s in loras]
        self.entries.extend(new)
        try:
            self.rebuild()
        except Exception:
            self.entries = [e for e in self.entries if all(e is not n for n in new)]
            self.rebuild()
            raise
        return new

    def remove(self, entry: ActiveLora | None = None) -> None:
        """Take one LoRA (or, with None, every LoRA) off; the base weights are restored bit for bit."""
        self.entries = [] if entry is None else [e for e in self.entries if e is not entry]
        self.rebuild()

    def rebuild(self) -> None:
        """Restore the base, then apply every entry (strength 0 entries are skipped)."""
        self.restore()
        live = [e for e in self.entries if e.strength != 0]
        if not live:
            return
        table = module_table(self.model)
        names = dict.fromkeys(n for e in live for n in e.lora.patches)
        missing = [n for n in names if n not in table]
        if missing:
            raise InputError(
                f"LoRA layers {missing[:5]} are not in this transformer; the LoRA was read for another model"
            )
        dtype = getattr(self.model, "dtype", torch.float32)
        for name in names:
            module = table[name]
            fly = [(e, e.lora.patches[name]) for e in live if name in e.lora.patches and e.mode == "fly"]
            merge = [(e, e.lora.patches[name]) for e in live if name in e.lora.patches and e.mode == "merge"]
            if not _is_linear(module):
                merge, fly = merge + fly, []
            elif merge and isinstance(module, Fp8Linear) and not module.fmt.is_fp8:
                logger.warning(
                    "%s is stored as %s: its LoRA runs on the fly (merging cannot requantise that format "
                    "without losing the LoRA)",
                    name,
                    module.fmt.name,
                )
                merge, fly = [], fly + merge
            if merge:
                self._merge(module, merge)
            if fly:
                self._attach(module, fly, dtype)

    def restore(self) -> None:
        """Remove every branch and hook and put every merged tensor back (no entry is dropped)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._branched:
            if BRANCH in m._modules:
                del m._modules[BRANCH]
        self._branched.clear()
        for owner, attr, is_param, original in reversed(self._backups):
            current = owner._parameters[attr] if is_param else owner._buffers[attr]
            if current is not None and current.device != original.device:
                original = original.to(current.device)
            if is_param:
                owner._parameters[attr].data = original  # type: ignore[union-attr]
            else:
                owner._buffers[attr] = original
        self._backups.clear()

    @property
    def extra_bytes(self) -> int:
        """Bytes the applied LoRAs add now: branch buffers plus merged copies (originals are kept)."""
        total = sum(b.numel() * b.element_size() for m in self._branched for b in getattr(m, BRANCH).buffers())
        return total + sum(t.numel() * t.element_size() for _, _, _, t in self._backups)

    # -- fly -----------------------------------------------------------------------------------------------
    def _attach(self, module: nn.Module, items: list[tuple[ActiveLora, LoraPatch]], dtype: torch.dtype) -> None:
        device = _weight(module).device
        downs, ups = [], []
        wd: Tensor | None = None
        bd: Tensor | None = None
        for e, p in items:
            if p.down is not None and p.up is not None:
                downs.append(p.down)
                ups.append(p.up * (p.scale * e.strength))
            if p.diff is not None:
                d = p.diff.reshape(_out_in(module)) * e.strength
                wd = d if wd is None else wd + d
            for b in (p.diff_b, p.up_bias if p.up_bias is None else p.up_bias * p.scale):
                if b is not None:
                    bd = b * e.strength if bd is None else bd + b * e.strength
        down = torch.cat(downs).to(device, dtype) if downs else None
        up = torch.cat(ups, dim=1).to(device, dtype) if ups else None
        branch = LoraBranch(
            down, up, None if wd is None else wd.to(device, dtype), None if bd is None else bd.to(device, dtype)
        )
        module.add_module(BRANCH, branch)
        self._branched.append(module)
        self._hooks.append(module.register_forward_hook(_add_branch))

    # -- merge ---------------------------------------------------------------------------------------------
    def _swap(self, owner: nn.Module, attr: str, is_param: bool, new: Tensor) -> None:
        old = owner._parameters[attr] if is_param else owner._buffers[attr]
        assert old is not None
        self._backups.append((owner, attr, is_param, old.data if is_param else old))
        if is_param:
            owner._parameters[attr].data = new  # type: ignore[union-attr]
        else:
            owner._buffers[attr] = new

    def _merge(self, module: nn.Module, items: list[tuple[ActiveLora, LoraPatch]]) -> None:
        weight = _weight(module)
        device = weight.device
        delta: Tensor | None = None
        bias_delta: Tensor | None = None
        for e, p in items:
            parts = []
            if p.down is not None and p.up is not None:
                parts.append((p.up.to(device) * (p.scale * e.strength)) @ p.down.to(device))
            if p.diff is not None:
                parts.append(p.diff.to(device) * e.strength)
            for d in parts:
                d = d.reshape(weight.shape if not is_fp8(weight.dtype) else _out_in(module))
                delta = d if delta is None else delta + d
            for b in (p.diff_b, None if p.up_bias is None else p.up_bias * p.scale):
                if b is not None:
                    b = b.to(device) * e.strength
                    bias_delta = b if bias_delta is None else bias_delta + b
        if delta is not None:
            if isinstance(module, Fp8Linear):
                merged = module.dequantized_weight(torch.float32) + delta
                w8, scale = quantize_tensor_fp8(merged, module.weight.dtype)
                self._swap(module, "weight", True, w8)
                self._swap(module, "weight_scale", False, scale.to(weight.device))
            else:
                self._swap(module, "weight", True, (weight.float() + delta).to(weight.dtype))
        if bias_delta is not None:
            bias = getattr(module, "bias", None)
            assert bias is not None
            self._swap(module, "bias", True, (bias.float() + bias_delta).to(bias.dtype))


def _weight(module: nn.Module) -> Tensor:
    w: Any = module.weight
    assert isinstance(w, Tensor)
    return w


def _out_in(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)  # type: ignore[arg-type]


def _check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise InputError(f"LoRA strength must be a number, got {strength!r}")
    value = float(strength)
    if not (-100.0 <= value <= 100.0):
        raise InputError(f"LoRA strength must lie in [-100, 100], got {value}; 1.0 is the LoRA as trained")
    return value


def _transformer(model: Any) -> nn.Module:
    dit = getattr(model, "transformer", model)
    if not isinstance(dit, nn.Module) or not hasattr(dit, "transformer_blocks"):
        raise InputError(f"expected a QwenLayeredModel or its transformer, got {type(model).__name__}")
    return dit


def lora_stack(model: Any) -> LoraStack:
    """The LoRA stack of a model (QwenLayeredModel or transformer), created empty on first use."""
    dit = _transformer(model)
    stack = dit.__dict__.get(STACK_ATTR)
    if stack is None:
        stack = LoraStack(dit)
        dit.__dict__[STACK_ATTR] = stack
    return stack


class LoraHandle:
    """What `load_lora` returns: the applied LoRA; `remove()` takes it off, `set_strength` changes it."""

    def __init__(self, stack: LoraStack, entry: ActiveLora) -> None:
        self._stack = stack
        self.entry = entry

    @property
    def active(self) -> bool:
        """True while the LoRA is on the model."""
        return any(e is self.entry for e in self._stack.entries)

    def set_strength(self, strength: float) -> None:
        """Change the strength (re-applies the stack)."""
        self.entry.strength = _check_strength(strength)
        self._stack.rebuild()

    def remove(self) -> None:
        """Take this LoRA off the model (the others stay)."""
        self._stack.remove(self.entry)

    def __repr__(self) -> str:
        return f"LoraHandle({self.entry.lora.name!r}, strength={self.entry.strength}, mode={self.entry.mode})"


def apply_lora(model: Any, lora: LoraFile, strength: float = 1.0, *, mode: str = "auto") -> LoraHandle:
    """Apply an already read LoRA to `model` at `strength` (stacks with those already applied)."""
    stack = lora_stack(model)
    return LoraHandle(stack, stack.add(lora, strength, mode))


def load_lora(model: Any, path: PathLike, strength: float = 1.0, *, mode: str = "auto") -> LoraHandle:
    """Read a LoRA .safetensors file and apply it to `model` (a QwenLayeredModel or its transformer).

    `mode`: "auto"/"fly" (low-rank branch, exact and cheap in memory) or "merge" (folded into the weights).
    Returns a handle whose `remove()` takes the LoRA off again; `remove_loras(model)` takes all off.
    """
    lora = read_lora(path, _transformer(model))
    return apply_lora(model, lora, strength, mode=mode)


def remove_loras(model: Any) -> None:
    """Take every LoRA off `model`; the base weights are bit for bit those loaded."""
    lora_stack(model).remove(None)


@contextlib.contextmanager
def loras_applied(model: Any, loras: Sequence[tuple[LoraFile, float]], *, mode: str = "auto") -> Iterator[None]:
    """Apply (lora, strength) pairs for the duration of the block, then take exactly those off again."""
    if not loras:
        yield
        return
    stack = lora_stack(model)
    added = stack.add_many(loras, mode)
    try:
        yield
    finally:
        ids = {e.id for e in added}
        stack.entries = [e for e in stack.entries if e.id not in ids]
        stack.rebuild()


__all__ = [
    "MODES",
    "LoraBranch",
    "LoraHandle",
    "LoraStack",
    "apply_lora",
    "load_lora",
    "lora_stack",
    "loras_applied",
    "remove_loras",
]
