"""``PairLogps``: the one input of every registered pairwise loss.

A batch of ``B`` preference pairs as ``[B]`` *summed* completion log-probs, optional reference
log-probs and token counts, and a ``mask`` that marks the real pairs. Packed batches and final
(eval) batches hold empty pair slots; a loss that couples the batch (token totals, sorting across
pairs) must see only the real ones, so it reads :meth:`PairLogps.real` and never the raw arrays'
length. Per-pair losses ignore the mask: their value at an empty slot is unspecified, and the caller
masks it (``jnp.where(logps.real(), per_pair, 0.0)``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import Array, at_least_f32, per_token, require


@jax.tree_util.register_dataclass  # a pytree (jit, vmap, tree.map) without flax: losses stay pure JAX
@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per-pair inputs of a pairwise loss, all ``[B]``.

    Attributes:
      chosen, rejected: summed policy log-probs ``log pi(y_w)``, ``log pi(y_l)``.
      ref_chosen, ref_rejected: the same under the reference (``None`` for reference-free losses).
      chosen_lengths, rejected_lengths: completion token counts ``n_w``, ``n_l`` (``None`` if unused).
      mask: True (or 1) for real pairs, False (or 0) for empty slots; ``None`` means every pair is real.
        Values at empty slots may be anything finite or not: no real pair's loss depends on them.
    """

    chosen: Array
    rejected: Array
    ref_chosen: Array | None = None
    ref_rejected: Array | None = None
    chosen_lengths: Array | None = None
    rejected_lengths: Array | None = None
    mask: Array | None = None

    def replace(self, **changes) -> PairLogps:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def real(self) -> Array:
        """``[B]`` bool: True for the real pairs."""
        shape = jnp.shape(self.chosen)
        return jnp.ones(shape, bool) if self.mask is None else jnp.broadcast_to(jnp.asarray(self.mask) > 0, shape)

    def policy(self) -> tuple[Array, Array]:
        """``(log pi(y_w), log pi(y_l))`` in at least float32."""
        return at_least_f32(self.chosen), at_least_f32(self.rejected)

    def reference(self, loss: str) -> tuple[Array, Array]:
        """``(log pi_ref(y_w), log pi_ref(y_l))`` in at least float32; a ValueError if ``loss`` lacks them."""
        return require(self.ref_chosen, "ref_chosen", loss), require(self.ref_rejected, "ref_rejected", loss)

    def per_token(self, chosen: Array, rejected: Array, loss: str, hint: str = "") -> tuple[Array, Array]:
        """``(chosen / n_w, rejected / n_l)``: summed values per completion token (lengths at least 1)."""
        return (
            per_token(chosen, self.chosen_lengths, name="chosen_lengths" + hint, loss=loss),
            per_token(rejected, self.rejected_lengths, name="rejected_lengths" + hint, loss=loss),
        )


def masked_sum(x: Array, real: Array) -> Array:
    """``sum_i x_i`` over the real pairs only; garbage (even inf/NaN) at empty slots cannot leak in."""
    return jnp.sum(jnp.where(real, x, jnp.zeros_like(x)))


def sort_real(x: Array, real: Array) -> Array:
    """``[B]``: the real entries of ``x`` sorted ascending in the first ``sum(real)`` slots, +inf after."""
    return jnp.sort(jnp.where(real, x, jnp.inf))


def to_real_slots(quantiles: Array, real: Array) -> Array:
    """Places the ``k = sum(real)`` leading entries of ``quantiles`` ``[B]`` at the real slots, in order
    (the j-th real slot gets entry j), and 0 at the empty slots."""
    rank = jnp.clip(jnp.cumsum(real.astype(jnp.int32)) - 1, 0, real.shape[0] - 1)
    return jnp.where(real, jnp.take(quantiles, rank), jnp.zeros_like(quantiles))


def from_arrays(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array | None = None,
    reference_rejected_logps: Array | None = None,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    mask: Array | None = None,
) -> PairLogps:
    """The legacy positional form ``(pc, pr, rc, rr, chosen_lengths=, rejected_lengths=)`` as a :class:`PairLogps`."""
    return PairLogps(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        mask,
    )


__all__ = ["PairLogps", "from_arrays", "masked_sum", "sort_real", "to_real_slots"]
