"""Declarative HF <-> cpo_jax weight tables, used both for import and for export.

A family's table is a list of :class:`WeightRule`. ``{i}`` in both names stands for the layer index.
One rule says: the HF tensor ``hf`` is our parameter ``ours`` (a dotted NNX path), transposed when
``transpose`` (HF ``nn.Linear`` stores ``[out, in]``, we store ``[in, out]``), and, when ``split`` is
``(axis, part, parts)``, our parameter is only part number ``part`` of the HF tensor along ``axis``: one of
``parts`` equal parts (GPT-2's fused ``c_attn``), or, when ``parts`` is a tuple of relative sizes, a part of
``parts[part] / sum(parts)`` of the axis (Phi-3's fused ``qkv_proj``, sizes ``(N, K, K)`` in heads). With
``interleaved`` the ``parts`` equal parts interleave instead of following each other: part ``p`` is every
``parts``-th entry from ``p`` (gpt-oss's fused ``gate_up_proj``: gate ``[..., 0::2]``, up ``[..., 1::2]``); a
device block then reads a strided slice of the HF tensor.
``{e}`` in the HF name only stands for an expert index: our parameter stacks the ``E`` HF tensors (one per
expert) along a leading ``expert`` axis, after the ``layers`` axis of scanned layers (MoE families).
A rule with ``packing="mxfp4"`` also reads its tensor ``[..., in, out]`` when a checkpoint stores it in MXFP4
(OCP microscaling FP4, gpt-oss's Hub checkpoints): ``{hf}_blocks`` ``[..., out, in / 32, 16]`` uint8 (two E2M1 codes
per byte, low nibble first) and ``{hf}_scales`` ``[..., out, in / 32]`` uint8 (E8M0 exponents, bias 127), dequantised
as transformers' ``convert_moe_packed_tensors`` does (:func:`dequantize_mxfp4`); export writes it unpacked.
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
    layers: tuple[int, ...] | None = None  # the layers a ``{i}`` rule binds (None: all; MoE models' dense layers)
    interleaved: bool = False  # ``split`` parts interleave along the axis (part p: entries p, p + parts, ...)
    packing: str | None = None  # "mxfp4": the tensor may be stored as ``{hf}_blocks`` + ``{hf}_scales``

    def __post_init__(self):
        if self.interleaved and (self.split is None or not isinstance(self.split[2], int)):
            raise ValueError(f"{self.hf}: interleaved needs a split into equal parts, (axis, part, parts: int)")
        if self.packing not in (None, "mxfp4"):
            raise ValueError(f"{self.hf}: unknown packing {self.packing!r}; expected None or 'mxfp4'")

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
        return re.compile(pattern + ("(?:_blocks|_scales)?$" if self.packing else "$"))


@dataclasses.dataclass(frozen=True)
class Binding:
    """A rule bound to one layer (and expert): the concrete HF name, our path, our layer index (or None) and the
    expert index along our parameter's expert axis (or None)."""

    hf_name: str
    path: tuple[str | int, ...]
    layer: int | None
    rule: WeightRule
    expert: int | None = None
    packed: bool = False  # the checkpoint stores the tensor packed (``rule.packing``; see :func:`mark_packed`)

    @property
    def stored_names(self) -> tuple[str, ...]:
        """The checkpoint tensors this binding reads: its name, or the packed ``_blocks`` and ``_scales``."""
        return packed_names(self.hf_name) if self.packed else (self.hf_name,)


def packed_names(name: str) -> tuple[str, str]:
    """The ``(blocks, scales)`` tensor names of an MXFP4-packed tensor."""
    return f"{name}_blocks", f"{name}_scales"


def mark_packed(bindings: Sequence[Binding], available: Mapping[str, object]) -> list[Binding]:
    """``bindings`` with ``packed`` set where the rule allows packing and the checkpoint holds the packed tensors
    instead of the plain one."""
    return [
        dataclasses.replace(b, packed=True)
        if b.rule.packing and b.hf_name not in available and all(n in available for n in packed_names(b.hf_name))
        else b
        for b in bindings
    ]


def bind(table: Sequence[WeightRule], num_layers: int, scan_layers: bool, num_experts: int = 0) -> list[Binding]:
    """Expand ``{i}`` over the layers and ``{e}`` over ``num_experts`` experts. With ``scan_layers`` our path drops
    the layer index (stacked axis 0); the expert index is never in our path (the expert axis follows)."""
    out = []
    for rule in table:
        layers = (range(num_layers) if rule.layers is None else rule.layers) if rule.per_layer else [None]
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
    if rule.interleaved:
        _, part, parts = rule.split
        mapped[axis] = slice(part + start * parts, part + max(start, stop - 1) * parts + int(stop > start), parts)
    else:
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


def read_block(handle, binding: Binding, index: tuple[slice, ...], scales_handle=None) -> np.ndarray:
    """Read one device block of our parameter from an open safetensors handle (memory-mapped).

    A packed binding reads ``_blocks`` from ``handle`` and ``_scales`` from ``scales_handle`` (default: ``handle``),
    only the rows and 32-entry groups that hold the block, and dequantises them to float32."""
    if binding.packed:
        block = _read_mxfp4(handle, handle if scales_handle is None else scales_handle, binding, index)
    else:
        tensor = handle.get_slice(binding.hf_name)
        block = tensor[hf_block_index(binding.rule, index, tensor.get_shape())]
    return block.T if binding.rule.transpose else block


#: The value of each E2M1 (FP4) code, as transformers' ``FP4_VALUES``.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
MXFP4_GROUP = 32  # values per E8M0 scale


def mxfp4_shape(blocks_shape: Sequence[int]) -> tuple[int, ...]:
    """The unpacked HF shape ``[..., in, out]`` of MXFP4 blocks ``[..., out, in / 32, 16]``."""
    *lead, out, groups, pairs = blocks_shape
    return (*lead, groups * pairs * 2, out)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Unpack MXFP4 ``blocks`` ``[..., rows, G, 16]`` and ``scales`` ``[..., rows, G]`` (uint8): ``[..., rows, 32G]``.

    Entry ``2j`` of a group is the low nibble of byte ``j`` and ``2j + 1`` its high nibble; each is
    ``FP4_VALUES[code] * 2 ** (scale - 127)``, in float32 as transformers' ``convert_moe_packed_tensors`` computes it
    (which then transposes the last two axes). Every such value is also exact in bfloat16."""
    blocks = np.asarray(blocks, np.uint8)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., rows, G, 16, 2]
    scale = np.exp2(np.asarray(scales).astype(np.int32) - 127).astype(np.float32)
    return (FP4_VALUES[codes] * scale[..., None, None]).reshape(*blocks.shape[:-2], -1)


def _read_mxfp4(handle, scales_handle, binding: Binding, index: tuple[slice, ...]) -> np.ndarray:
    """The block ``index`` of the unpacked HF tensor ``[..., in, out]`` of a packed binding."""
    blocks_name, scales_name = packed_names(binding.hf_name)
    blocks = handle.get_slice(blocks_name)
    shape = mxfp4_shape(blocks.get_shape())
    *lead, rows, cols = hf_block_index(binding.rule, index, shape)
    start, stop = _norm_slice(rows, shape[-2])
    first, last = start // MXFP4_GROUP, -(-stop // MXFP4_GROUP)
    values = dequantize_mxfp4(
        blocks[(*lead, cols, slice(first, last), slice(None))],
        scales_handle.get_slice(scales_name)[(*lead, cols, slice(first, last))],
    )  # [..., out block, groups * 32]
    offset = first * MXFP4_GROUP
    return np.swapaxes(values[..., start - offset : stop - offset], -1, -2)


def to_hf(rule: WeightRule, value: np.ndarray) -> np.ndarray:
    """Our parameter (or split part) -> the HF layout (before any concatenation of split parts)."""
    return np.ascontiguousarray(value.T if rule.transpose else value)


def join_parts(rule: WeightRule, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The HF tensor from its parts in the HF layout (:func:`to_hf`, ordered by part): the one array, the parts
    concatenated along the split axis, or with ``interleaved`` woven entry by entry along it."""
    if rule.split is None:
        (array,) = arrays
        return array
    axis = rule.split[0] % arrays[0].ndim
    if not rule.interleaved:
        return np.concatenate(arrays, axis=axis)
    woven = np.stack(arrays, axis=axis + 1)  # [..., n, parts, ...] -> [..., n * parts, ...]
    return woven.reshape(*arrays[0].shape[:axis], -1, *arrays[0].shape[axis + 1 :])


def group_parts(bindings: Sequence[Binding]) -> Iterator[tuple[str, list[Binding]]]:
    """Group bindings by HF name in table order, parts of a split ordered by their index."""
    groups: dict[str, list[Binding]] = {}
    for b in bindings:
        groups.setdefault(b.hf_name, []).append(b)
    for name, parts in groups.items():
        parts.sort(key=lambda b: b.rule.split[1] if b.rule.split else 0)
        yield name, parts
