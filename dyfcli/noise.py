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
        threshold = _keep_threshold(drop_probability)
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


def _keep_threshold(drop_probability: float) -> int:
    """The int16 draw at and above which an element is kept (2**15, no int16, means nothing is kept)."""
    return math.ceil(drop_probability * 2**16) - 2**15


class KeepBatch:
    """Several `bernoulli_keep` masks drawn with one hash: `KeepBatch(specs).masks(noise)[i]` equals
    `noise.fold(salt_i).bernoulli_keep(shape_i, p_i)` bit for bit, `specs` = [(salt, shape, p), ...].

    Why: each mask alone costs about thirty small operations (fold, counter, mix, compare), which on a GPU
    are thirty kernel launches per dropout layer per network call; masks drawn together cost about thirty in
    all, plus one view each. Their words form one (B, N) int64 matrix: mask i's words are its folded keys
    (column i of the (B, L) matrix of all folds, one `_mix`) XOR its own counter 1..n_i, one `_mix` for all,
    and one comparison with each draw's threshold. The column, counter and threshold vectors depend only on
    `specs`, so they are built once per device. Every p must keep something (`keeps_any`).
    """

    def __init__(self, specs: list[tuple[int, tuple[int, ...], float]]):
        assert specs and all(KeepBatch.keeps_any(p) for _, _, p in specs), specs
        self.specs = [(int(salt), tuple(shape), float(p)) for salt, shape, p in specs]
        sizes = [math.prod(shape) for _, shape, _ in self.specs]
        self.words = [-(-size // 4) for size in sizes]  # mask i: the first size_i of its 4 * words_i columns
        self._split_sizes = [n for size, words in zip(sizes, self.words) for n in (size, 4 * words - size)]
        self._vectors_on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def keeps_any(drop_probability: float) -> bool:
        """Whether a mask of rate p can keep anything (p <= 1 - 2**-16; `bernoulli_keep` gives zeros otherwise)."""
        return _keep_threshold(drop_probability) < 2**15

    def words_per_row(self) -> int:
        """64-bit hashes per batch row: the int64 temporaries of `draw` are B times this."""
        return sum(self.words)

    def _vectors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(salts (L,), column of each word (N,), counter (N,), threshold of each 16-bit draw (4N,))."""
        vectors = self._vectors_on.get(device)
        if vectors is None:
            with torch.inference_mode(False):  # plain tensors: also usable where autograd records
                salts = torch.tensor([_wrap((salt + 1) * _GOLDEN) for salt, _, _ in self.specs], dtype=torch.int64)
                words = torch.tensor(self.words, dtype=torch.int64)
                column = torch.repeat_interleave(torch.arange(len(self.specs)), words)
                counter = torch.cat([torch.arange(1, n + 1, dtype=torch.int64) for n in self.words])
                thresholds = torch.tensor([_keep_threshold(p) for _, _, p in self.specs], dtype=torch.int16)
                vectors = tuple(v.to(device) for v in (salts, column, counter, thresholds.repeat_interleave(4 * words)))
            self._vectors_on[device] = vectors
        return vectors

    def draw(self, noise: MemberNoise) -> torch.Tensor:
        """All masks side by side, bool (B, 4N): mask i's 4 * words[i] columns follow those of masks < i."""
        salts, column, counter, thresholds = self._vectors(noise.keys.device)
        folded = _mix(noise.keys[:, None] + salts)  # (B, L): noise.fold(salt_i).keys for every i at once
        words = _mix(folded.index_select(1, column).bitwise_xor_(counter))  # (B, N)
        return words.view(torch.int16) >= thresholds  # four 16-bit draws per word, low half first

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Views (B, *shape_i) of a (B, 4N) tensor laid out as `draw`'s (e.g. the masks scaled or cast)."""
        parts = matrix.split_with_sizes(self._split_sizes, dim=1)[::2]  # the odd parts are padding
        return [part.view(matrix.shape[0], *shape) for part, (_, shape, _) in zip(parts, self.specs)]

    def masks(self, noise: MemberNoise) -> list[torch.Tensor]:
        """Bool masks (B, *shape_i), equal to `noise.fold(salt_i).bernoulli_keep(shape_i, p_i)`."""
        return self.split(self.draw(noise))
