"""Counter-derived random streams for the kernel.

Numba's ``np.random`` state is per thread and cannot be seeded per image from outside
the kernel, so the kernel carries its own generator: every image gets a xoshiro256**
stream whose state is derived from (dataset key, image index) with SplitMix64.  The
bytes of an image therefore depend only on the seed, the dataset and the index, never
on the thread, batch or shard that computed it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numba import njit

_U64 = np.uint64
_MASK53 = 1.0 / 9007199254740992.0  # 2**-53


def dataset_key(seed: int, dataset: str) -> np.uint64:
    """64-bit key of a dataset's streams, from the config seed and the dataset name."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{dataset}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def substream_key(key, label: str) -> np.uint64:
    """Key of a named family of streams beside a dataset's own (``key``).

    Draws taken from it leave the dataset's streams, and every array drawn from them,
    as they were.
    """
    digest = hashlib.blake2b(int(key).to_bytes(8, "little") + b"\x00" + label.encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


@njit(inline="always", cache=True)
def _splitmix64(x):
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


@njit(inline="always", cache=True)
def _rotl(x, k):
    return (x << _U64(k)) | (x >> _U64(64 - k))


STATE_SIZE = 4  # xoshiro256** words


@njit(cache=True)
def seed_state(key, index, state):
    """Fill ``state`` (STATE_SIZE x uint64) with the stream of image ``index`` of ``key``."""
    x = _splitmix64(key ^ _splitmix64(_U64(index)))
    for i in range(4):
        x = _splitmix64(x + _U64(i))
        state[i] = x
    if state[0] == 0 and state[1] == 0 and state[2] == 0 and state[3] == 0:
        state[0] = _U64(1)


def new_state(key, index) -> np.ndarray:
    """A fresh state of the stream of image ``index`` of ``key`` (``seed_state``)."""
    state = np.empty(STATE_SIZE, np.uint64)
    seed_state(np.uint64(key), index, state)
    return state


@njit(inline="always", cache=True)
def next_u64(s):
    """The next 64-bit output of the xoshiro256** state ``s`` (advanced in place)."""
    result = _rotl(s[1] * _U64(5), 7) * _U64(9)
    t = s[1] << _U64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return result


@njit(inline="always", cache=True)
def uniform(s):
    """Uniform double in [0, 1)."""
    return float(next_u64(s) >> _U64(11)) * _MASK53


@njit(inline="always", cache=True)
def normal_pair(s):
    """Two independent standard normals (Marsaglia's polar method: no sin/cos)."""
    while True:
        v1 = 2.0 * uniform(s) - 1.0
        v2 = 2.0 * uniform(s) - 1.0
        r2 = v1 * v1 + v2 * v2
        if 0.0 < r2 < 1.0:
            f = math.sqrt(-2.0 * math.log(r2) / r2)
            return v1 * f, v2 * f


@njit(inline="always", cache=True)
def normal(s):
    """One standard normal."""
    return normal_pair(s)[0]


@njit(cache=True)
def poisson(s, lam):
    """Poisson variate: multiplication method below 10, Hormann's PTRS above."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        enlam = math.exp(-lam)
        k = 0
        prod = uniform(s)
        while prod > enlam:
            k += 1
            prod *= uniform(s)
        return k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = uniform(s) - 0.5
        v = uniform(s)
        us = 0.5 - abs(u)
        k = int(math.floor((2.0 * a / us + b) * u + lam + 0.43))
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return k


@njit(cache=True)
def gamma(s, shape):
    """Gamma(shape, scale=1) variate (Marsaglia and Tsang; boosted below shape 1)."""
    if shape <= 0.0:
        return 0.0
    if shape < 1.0:
        return gamma(s, shape + 1.0) * (1.0 - uniform(s)) ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = normal(s)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = 1.0 - uniform(s)
        if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v
