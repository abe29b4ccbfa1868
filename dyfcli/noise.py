"""Counter-based random numbers keyed per ensemble member (pure torch).

Why not `torch.Generator`: one generator per batch makes a member's draws depend on which other members
share its batch, so `--member-batch` or the number of ranks would change the forecast. Here every row of a
batch carries its own 64-bit key, and each number is a hash of (key, element index): member m's dropout
masks and noise are the same whether it runs alone, in a batch of 50, on CPU or on GPU.

The hash is SplitMix64's finaliser evaluated on int64 tensors (multiplication wraps modulo 2**64; right
shifts are made logical by masking). Element j of a row is the finaliser of (key XOR j): keys are already
mixed 64-bit values, and unlike SplitMix64's key + j * golden ratio this keeps 64-bit constants away from
the element index, which torch.compile would fold into index arithmetic that overflows int64 (so masks
compile into the networks' graphs instead of breaking them at every dropout layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser; works in place on `z` where it can (it is large for dropout masks)."""
    z = z ^ _shift_right(z, 30)
    z.mul_(_MIX1)
    z.bitwise_xor_(_shift_right(z, 27))
    z.mul_(_MIX2)
    return z.bitwise_xor_(_shift_right(z, 31))


def _wrap(value: int) -> int:
    """Reduce a Python int to the signed int64 with the same low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_int(key: int, salt: int) -> int:
    """Python-int version of one fold, used to build keys from seeds without a device."""
    mask = (1 << 64) - 1
    z = (key + (salt + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@dataclass(frozen=True)
class MemberNoise:
    """Independent random streams, one per batch row.

    `keys` has shape (B,), dtype int64. Draws have shape (B, *shape); row b depends only on `keys[b]`.
    """

    keys: torch.Tensor

    @staticmethod
    def for_members(seed: int, member_ids: torch.Tensor | list[int], salt: int = 0,
                    device: torch.device | str | None = None) -> MemberNoise:
        """Streams for the given global member ids (e.g. `init_index * M + member`) under `seed`."""
        ids = torch.as_tensor(member_ids, dtype=torch.int64, device=device)
        base = _mix_int(_mix_int(int(seed), int(salt)), 0x5EED)
        return MemberNoise(_mix(base + (ids + 1) * _GOLDEN))

    def fold(self, salt: int) -> MemberNoise:
        """A new independent stream per row, e.g. one per network call or per dropout layer."""
        return MemberNoise(_mix(self.keys + _wrap((int(salt) + 1) * _GOLDEN)))

    def repeat_interleave(self, repeats: int) -> MemberNoise:
        return MemberNoise(self.keys.repeat_interleave(repeats))

    def __getitem__(self, index) -> MemberNoise:
        return MemberNoise(self.keys[index])

    def __len__(self) -> int:
        return self.keys.shape[0]

    def _words(self, count: int) -> torch.Tensor:
        """`count` 64-bit hashes per row, int64 (B, count): element j of row b is mix(keys[b] ^ (j + 1))."""
        counter = torch.arange(1, count + 1, dtype=torch.int64, device=self.keys.device)
        return _mix(self.keys[:, None] ^ counter[None, :])

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) draws of shape (B, *shape), 24 random bits each (the top bits of one hash per element)."""
        bits = _shift_right(self._words(math.prod(shape)), 40).view(len(self), *shape)
        return (bits.to(torch.float32) * 2.0**-24).to(dtype)

    def bernoulli_keep(self, shape: tuple[int, ...], drop_probability: float) -> torch.Tensor:
        """Bool mask of shape (B, *shape), True with probability 1 - ceil(p * 2**16) / 2**16.

        Each 64-bit hash is read as four 16-bit draws (its int64 memory viewed as int16, low half first:
        the same on every little-endian device), so a mask costs a quarter of the hashing of `uniform`:
        dropout masks are the largest random draws of a forecast (every MC-dropout layer of every
        interpolator call).
        """
        count = math.prod(shape)
        threshold = math.ceil(drop_probability * 2**16) - 2**15
        if threshold >= 2**15:  # p > 1 - 2**-16: nothing is kept (and 2**15 is no int16)
            return torch.zeros((len(self), *shape), dtype=torch.bool, device=self.keys.device)
        draws = self._words(-(-count // 4)).view(torch.int16)[:, :count]  # uniform on [-2**15, 2**15)
        return (draws >= threshold).view(len(self), *shape)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of shape (B, *shape) by Box-Muller."""
        u1 = self.fold(1).uniform(shape)
        u2 = self.fold(2).uniform(shape)
        radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # log1p(-u) is finite for u in [0, 1)
        return (radius * torch.cos(2.0 * math.pi * u2)).to(dtype)
