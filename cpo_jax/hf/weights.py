"""Declarative HF <-> cpo_jax weight tables, used both for import and for export.

A family's table is a list of :class:`WeightRule`. ``{i}`` in both names stands for the layer index.
One rule says: the HF tensor ``hf`` is our parameter ``ours`` (a dotted NNX path), transposed when
``transpose`` (HF ``nn.Linear`` stores ``[out, in]``, we store ``[in, out]``), and, when ``split`` is
``(axis, part, parts)``, our parameter is only that equal part of the HF tensor along ``axis`` (GPT-2's
fused ``c_attn``). Import reads each device's block of each tensor straight from the memory-mapped
safetensors file (:func:`read_block`); export inverts the same rules.
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
    split: tuple[int, int, int] | None = None

    @property
    def per_layer(self) -> bool:
        """True when the names contain the ``{i}`` layer placeholder."""
        return "{i}" in self.hf

    def hf_pattern(self) -> re.Pattern:
        """A regex matching the concrete HF names of this rule."""
        return re.compile(re.escape(self.hf).replace(re.escape("{i}"), r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Binding:
    """A rule bound to one layer: the concrete HF name, our path, and our layer index (or None)."""

    hf_name: str
    path: tuple[str | int, ...]
    layer: int | None
    rule: WeightRule


def bind(table: Sequence[WeightRule], num_layers: int, scan_layers: bool) -> list[Binding]:
    """Expand ``{i}`` over the layers. With ``scan_layers`` our path drops the index (stacked axis 0)."""
    out = []
    for rule in table:
        layers = range(num_layers) if rule.per_layer else [None]
        for i in layers:
            hf_name = rule.hf.format(i=i) if i is not None else rule.hf
            path: list[str | int] = []
            for part in rule.ours.split("."):
                if part == "{i}":
                    if not scan_layers:
                        path.append(i)
                else:
                    path.append(part)
            out.append(Binding(hf_name, tuple(path), i, rule))
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
    axis, part, parts = rule.split
    width = hf_shape[axis] // parts
    start, stop = _norm_slice(ours[axis], width)
    mapped = list(ours)
    mapped[axis] = slice(part * width + start, part * width + stop)
    return tuple(mapped)


def our_shape(rule: WeightRule, hf_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of our parameter given the HF tensor shape."""
    shape = list(hf_shape)
    if rule.split is not None:
        axis, _, parts = rule.split
        if shape[axis] % parts:
            raise ValueError(f"{rule.hf}: axis {axis} of size {shape[axis]} does not split into {parts}")
        shape[axis] //= parts
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
