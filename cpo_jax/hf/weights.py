"""Declarative HF <-> cpo_jax weight tables, used both for import and for export.

A family's table is a list of :class:`WeightRule`. ``{i}`` in both names stands for the layer index.
One rule says: the HF tensor ``hf`` is our parameter ``ours`` (a dotted NNX path), transposed when
``transpose`` (HF ``nn.Linear`` stores ``[out, in]``, we store ``[in, out]``), and, when ``split`` is
``(axis, part, parts)``, our parameter is only part number ``part`` of the HF tensor along ``axis``: one of
``parts`` equal parts (GPT-2's fused ``c_attn``), or, when ``parts`` is a tuple of relative sizes, a part of
``parts[part] / sum(parts)`` of the axis (Phi-3's fused ``qkv_proj``, sizes ``(N, K, K)`` in heads).
``{e}`` in the HF name only stands for an expert index: our parameter stacks the ``E`` HF tensors (one per
expert) along a leading ``expert`` axis, after the ``layers`` axis of scanned layers (MoE families).
Import reads each device's block of each tensor straight from the memory-mapped safetensors file
(:func:`read_block`); export inverts the same rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cpo_jax.errors import ModelError


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One HF tensor name <-> one cpo_jax parameter path (see the module docstring)."""

    hf: str
    ours: str
    transpose: bool = False
    split: tuple[int, int, int | tuple[int, ...]] | None = None

    @property
    def per_layer(self) -> bool:
        """True when the names contain the ``{i}`` layer placeholder."""
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        """True when the HF name contains the ``{e}`` expert placeholder (our parameter stacks the experts)."""
        return "{e}" in self.hf

    def hf_pattern(self) -> re.Pattern:
        """A regex matching the concrete HF names of this rule."""
        pattern = re.escape(self.hf).replace(re.escape("{i}"), r"(\d+)").replace(re.escape("{e}"), r"(\d+)")
        return re.compile(pattern + "$")


@dataclasses.dataclass(frozen=True)
class Binding:
    """A rule bound to one layer (and expert): the concrete HF name, our path, our layer index (or None) and the
    expert index along our parameter's expert axis (or None)."""

    hf_name: str
    path: tuple[str | int, ...]
    layer: int | None
    rule: WeightRule
    expert: int | None = None


def bind(table: Sequence[WeightRule], num_layers: int, scan_layers: bool, num_experts: int = 0) -> list[Binding]:
    """Expand ``{i}`` over the layers and ``{e}`` over ``num_experts`` experts. With ``scan_layers`` our path drops
    the layer index (stacked axis 0); the expert index is never in our path (the expert axis follows)."""
    out = []
    for rule in table:
        layers = range(num_layers) if rule.per_layer else [None]
        experts = range(num_experts) if rule.per_expert else [None]
        for i in layers:
            path: list[str | int] = []
            for part in rule.ours.split("."):
                if part == "{i}":
                    if not scan_layers:
                        path.append(i)
                else:
                    path.append(part)
            for e in experts:
                hf_name = rule.hf.replace("{i}", str(i)).replace("{e}", str(e))
                out.append(Binding(hf_name, tuple(path), i, rule, e))
    return out


def check_names(
    table: Sequence[WeightRule], available: Mapping[str, object], needed: Sequence[str], where: str
) -> None:
    """Raise :class:`ModelError` if the checkpoint lacks a needed tensor or holds one that no rule maps.

    ``available`` maps each tensor name in the checkpoint to its file (named in the error); ``where`` is the
    checkpoint directory, named when a tensor is missing.
    """
    mismatch = "config.json does not describe these weights: use the config.json saved with them"
    missing = [n for n in needed if n not in available]
    if missing:
        raise ModelError(
            f"checkpoint is missing {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}",
            where=where,
            hint=f"{mismatch}, or re-download an incomplete checkpoint",
        )
    patterns = [rule.hf_pattern() for rule in table]
    needed_set = set(needed)
    unknown = [n for n in available if n not in needed_set and not any(p.match(n) for p in patterns)]
    if unknown:
        raise ModelError(
            f"checkpoint holds {len(unknown)} tensor(s) with no mapping, e.g. {unknown[:5]}",
            where=str(available[unknown[0]]),
            hint=f"{mismatch} (e.g. a bias the config does not declare); other architectures are not "
            f"supported (docs/models.md)",
        )
    extra_layers = [n for n in available if n not in needed_set and n not in unknown]
    if extra_layers:
        raise ModelError(
            f"checkpoint holds tensors for layers the config does not have, e.g. {extra_layers[:5]}",
            where=str(available[extra_layers[0]]),
            hint=mismatch,
        )


def _norm_slice(s: slice, size: int) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError("strided device blocks are not supported")
    return start, stop


def hf_block_index(rule: WeightRule, index: tuple[slice, ...], hf_shape: Sequence[int]) -> tuple[slice, ...]:
    """Map a block of our (unstacked) parameter to the block of the HF tensor that holds it."""
    ours = tuple(index[::-1]) if rule.transpose else tuple(index)
    if rule.split is None:
        return ours
    axis = rule.split[0]
    offset, width = split_range(rule, hf_shape[axis])
    start, stop = _norm_slice(ours[axis], width)
    mapped = list(ours)
    mapped[axis] = slice(offset + start, offset + stop)
    return tuple(mapped)


def split_range(rule: WeightRule, size: int) -> tuple[int, int]:
    """``(offset, width)`` of ``rule``'s part along its split axis of ``size`` entries in the HF tensor.

    Raises ``ValueError`` when the parts do not divide ``size``."""
    _, part, parts = rule.split
    sizes = (1,) * parts if isinstance(parts, int) else tuple(parts)
    if size % sum(sizes):
        raise ValueError(f"{rule.hf}: an axis of size {size} does not split into parts of relative sizes {sizes}")
    unit = size // sum(sizes)
    return unit * sum(sizes[:part]), unit * sizes[part]


def our_shape(rule: WeightRule, hf_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of our parameter given the HF tensor shape."""
    shape = list(hf_shape)
    if rule.split is not None:
        axis = rule.split[0]
        shape[axis] = split_range(rule, shape[axis])[1]
    return tuple(shape[::-1]) if rule.transpose else tuple(shape)


def read_block(handle, binding: Binding, index: tuple[slice, ...]) -> np.ndarray:
    """Read one device block of our parameter from an open safetensors handle (memory-mapped)."""
    tensor = handle.get_slice(binding.hf_name)
    block = tensor[hf_block_index(binding.rule, index, tensor.get_shape())]
    return block.T if binding.rule.transpose else block


def to_hf(rule: WeightRule, value: np.ndarray) -> np.ndarray:
    """Our parameter (or split part) -> the HF layout (before any concatenation of split parts)."""
    return np.ascontiguousarray(value.T if rule.transpose else value)


def group_parts(bindings: Sequence[Binding]) -> Iterator[tuple[str, list[Binding]]]:
    """Group bindings by HF name in table order, parts of a split ordered by their index."""
    groups: dict[str, list[Binding]] = {}
    for b in bindings:
        groups.setdefault(b.hf_name, []).append(b)
    for name, parts in groups.items():
        parts.sort(key=lambda b: b.rule.split[1] if b.rule.split else 0)
        yield name, parts
