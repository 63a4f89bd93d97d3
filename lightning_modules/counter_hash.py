"""Counter-based random numbers: a 32-bit integer hash of (seed, counter), so that a random draw depends only on
what it is for (a corpus row and a latent, an optimizer step and a weight), not on the order or the chunks in which
the work is done, the device, or a generator's state."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

MASK32 = 0xFFFFFFFF

Integers = TypeVar("Integers", int, Tensor)


def mix32(x: Integers) -> Integers:
    """A 32-bit integer mixer (xorshift-multiply twice with 0x45D9F3B, T. Mueller's constant, then a last
    xorshift) of 32-bit values: a Python int, or an int64 tensor elementwise (its products stay below 2^59)."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x
