"""The three backbones of the DYffusion paper, with reproducible per-member MC dropout (pure torch).

Kinds (parameter counts at the paper's settings match the reference implementation exactly, see
`tests/test_networks.py`):

- `"unet"`: the SST `Unet` (dim 64, dim_mults (1, 2, 4), ResNet blocks, linear attention, full attention in
  the middle). Input `[cond, x]`. Any grid: padded at the bottom/right to a multiple of 2**(levels-1) and
  cropped back (replicate padding by default, so no artificial edge appears; 60x60 needs no padding).
- `"unet-ns"`: the Navier-Stokes `UNet` (dim 64): bilinear resample of `[x, cond]` to 256x256, six stride-2
  encoder blocks, six bilinear-upsampling decoder blocks with skips, transposed-conv readout, bilinear
  resample back to the input grid.
- `"cnn"`: the spring-mesh `SimpleConvNet` (dim 64, kernels 9-7-5-3 with same padding, residual when
  channels match, 1x1 head). Input `[x, cond]`; works on any grid.

Periodic longitude: `unet` and `cnn` take `periodic_x=True` (a store whose x axis spans 360 degrees,
`DataStore.periodic_x`). Then every convolution with spatial padding pads x circularly (y keeps zero
padding: the poles are kept as rows, not wrapped), and the `unet` pads x to its multiple by wrapping
around, so the networks see no edge at the 0/360 seam: shifting the input circularly along x by a multiple
of the coarsest stride (`2**(levels-1)` for `unet`, 1 for `cnn`) shifts the output by the same amount.
`unet-ns` resamples bilinearly and reads out with a transposed convolution, neither of which wraps, so it
has no `periodic_x` (`supports_periodic_x`).

Every network is called as `net(x (B, Cin, Y, X), time (B,) or None, cond (B, Ccond, Y, X) or None)` and
returns `(B, Cout, Y, X)`. `time` is the raw (unnormalised, possibly fractional) interpolation time or
diffusion step; it feeds `SinusoidalEmbedding(dim)` -> Linear(dim, 2dim) -> GELU -> Linear(2dim, 2dim), and
every block turns that vector into a FiLM `x * (1 + scale) + shift` applied after normalisation and before
the activation. `with_time=False` builds no time path at all, and `time` is then ignored.

Dropout: every dropout of the paper is a `MemberDropout`. Outside `mc_dropout` it behaves like
`nn.Dropout` (on when the module is training). Inside `with mc_dropout(net, noise):` every dropout layer is
on whatever the train/eval mode of the other layers (BatchNorm keeps using its running statistics in eval
mode), and with a `MemberNoise` the mask of batch row b depends only on row b's key and the layer: a
member gets the same masks alone or in any batch, on any device. An eager call draws all its masks with one
hash (a mask plan learnt on the first call with the same input shape), the same masks as layer by layer.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dyfcli.noise import KeepBatch, MemberNoise

KINDS = ("unet", "unet-ns", "cnn")


# --------------------------------------------------------------------------------------------------------
# Dropout whose masks come from per-member random streams
# --------------------------------------------------------------------------------------------------------


class MemberDropout(nn.Module):
    """Inverted dropout with rate `p`; inside `mc_dropout` it is always on and may draw from `MemberNoise`.

    `layer_id` is set once the whole network is built (the layer's rank among the network's dropout
    layers in `net.modules()` order), so it depends on the architecture only, not on the rates: layers
    fold the member noise with their id and therefore draw independent masks.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1), got {p}; pick a rate such as 0.1")
        self.p = float(p)
        self.layer_id = -1
        self.forced_on = False  # set by mc_dropout
        self.noise: MemberNoise | None = None  # set by mc_dropout
        self.masks: _ContextMasks | None = None  # set by mc_dropout: the masks of a call drawn at once

    def extra_repr(self) -> str:
        return f"p={self.p}, layer_id={self.layer_id}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if not self.forced_on:
            return F.dropout(x, self.p, self.training)
        if self.noise is None:
            return F.dropout(x, self.p, True)
        return x * self._member_mask(x)

    def _member_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-mask scaled by 1/(1-p), shape of x; row b from `noise.fold(layer_id)` row b only."""
        if len(self.noise) != x.shape[0]:
            raise ValueError(f"MC-dropout noise has {len(self.noise)} rows but the batch has {x.shape[0]}; "
                             "pass one MemberNoise row per batch row")
        # Compiled graphs fuse each layer's hash into its own kernels: drawing masks together is for eager
        # calls (and the compiler never looks at `masks`, a new object per context, so it never recompiles).
        if not torch.compiler.is_compiling() and self.masks is not None:
            return self.masks.scaled_mask(self.layer_id, self.p, x)
        keep = self.noise.fold(self.layer_id).bernoulli_keep(tuple(x.shape[1:]), self.p)
        return keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def _number_dropout_layers(net: nn.Module) -> None:
    for layer_id, layer in enumerate(m for m in net.modules() if isinstance(m, MemberDropout)):
        layer.layer_id = layer_id


# The dropout layers of each network, found once: sampling enters `mc_dropout` at every network call.
_DROPOUT_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dropout_layers(net: nn.Module) -> list[MemberDropout]:
    layers = _DROPOUT_LAYERS.get(net)
    if layers is None:  # a built network does not gain or lose layers
        layers = _DROPOUT_LAYERS[net] = [m for m in net.modules() if isinstance(m, MemberDropout)]
    return layers


# A mask is a pure function of the context's noise and this key: (layer_id, p, input shape with batch, dtype).
_MaskKey = tuple[int, float, tuple[int, ...], torch.dtype]

# Masks drawn together use at most this many 64-bit words (B x words per row): int64 temporaries of 32 MiB
# and masks of 64 MiB on a CPU, where only tiny grids are launch-bound and all their masks fit; 4x that on
# an accelerator, where a 50-member SST call (56M words) then takes about four draws instead of 37.
_SEGMENT_WORDS = {"cpu": 1 << 22}
_ACCELERATOR_SEGMENT_WORDS = 1 << 24
_MAX_SEGMENTS = 64  # per network: a few input shapes' worth; the oldest are forgotten first


class _MaskSegment:
    """Consecutive masks of a network call, of one dtype, drawn together: one `KeepBatch`, one cast and one
    scaling by 1/(1-p) for all of them (the scale of each column made by the very operation a lone mask uses,
    so the masks are the same bit for bit), then one view each."""

    def __init__(self, keys: list[_MaskKey]):
        self.keys = tuple(keys)
        self.dtype = keys[0][3]
        self.batch = KeepBatch([(layer_id, shape[1:], p) for layer_id, p, shape, _ in keys])
        self._scales_on: dict[torch.device, torch.Tensor] = {}

    def draw(self, noise: MemberNoise) -> dict[_MaskKey, torch.Tensor]:
        device = noise.keys.device
        scales = self._scales_on.get(device)
        if scales is None:
            with torch.inference_mode(False):
                scales = self._scales_on[device] = torch.cat([
                    torch.ones(4 * words, dtype=self.dtype, device=device).mul_(1.0 / (1.0 - p))
                    for (_, p, _, _), words in zip(self.keys, self.batch.words)])
        scaled = self.batch.draw(noise).to(self.dtype).mul_(scales)
        return dict(zip(self.keys, self.batch.split(scaled)))


class _MaskPlan:
    """What one network's MC-dropout calls draw, learnt from the calls seen (the shapes are only known
    during the forward pass): segments of consecutive masks, each keyed by the mask that starts it.

    When a layer finds no mask ready and its key starts a segment, the whole segment is drawn at once;
    a layer whose input differs from what was learnt finds no mask ready and no segment, so it draws its
    own mask as before, and the masks so drawn are learnt in turn. Every mask is the same either way.
    """

    def __init__(self):
        self.segments: dict[_MaskKey, _MaskSegment] = {}

    def learn(self, keys: list[_MaskKey], device: torch.device) -> None:
        """Split the masks of a call (in call order) into segments of one dtype within `_SEGMENT_WORDS`."""
        budget = _SEGMENT_WORDS.get(device.type, _ACCELERATOR_SEGMENT_WORDS)
        segment: list[_MaskKey] = []
        words = 0
        for key in keys:
            key_words = key[2][0] * -(-math.prod(key[2][1:]) // 4)
            if segment and (words + key_words > budget or key[3] != segment[0][3]):
                self._add(segment)
                segment, words = [], 0
            segment.append(key)
            words += key_words
        if segment:
            self._add(segment)

    def _add(self, keys: list[_MaskKey]) -> None:
        self.segments.pop(keys[0], None)  # re-inserted last: the newest are kept
        self.segments[keys[0]] = _MaskSegment(keys)
        while len(self.segments) > _MAX_SEGMENTS:
            del self.segments[next(iter(self.segments))]


class _ContextMasks:
    """The masks of one `mc_dropout` context: drawn a segment at a time as its plan says, each handed out
    once (so at most about one call's masks are held), and the masks drawn alone recorded for the plan."""

    def __init__(self, noise: MemberNoise, plan: _MaskPlan):
        self.noise = noise
        self.plan = plan
        self.ready: dict[_MaskKey, torch.Tensor] = {}
        self.recorded: list[_MaskKey] = []

    def scaled_mask(self, layer_id: int, p: float, x: torch.Tensor) -> torch.Tensor:
        """`noise.fold(layer_id).bernoulli_keep(x.shape[1:], p).to(x.dtype).mul_(1 / (1 - p))`, bit for bit."""
        key = (layer_id, p, tuple(x.shape), x.dtype)
        mask = self.ready.pop(key, None)
        if mask is not None:
            return mask
        if key in self.recorded:  # a second network call in this context: the first one is complete
            self.finish()
        segment = self.plan.segments.get(key)
        if segment is not None:
            self.ready.update(segment.draw(self.noise))
            return self.ready.pop(key)
        if KeepBatch.keeps_any(p):
            self.recorded.append(key)
        keep = self.noise.fold(layer_id).bernoulli_keep(tuple(x.shape[1:]), p)
        return keep.to(x.dtype).mul_(1.0 / (1.0 - p))

    def finish(self) -> None:
        """Teach the plan the masks drawn alone so far."""
        if self.recorded:
            self.plan.learn(self.recorded, self.noise.keys.device)
            self.recorded = []


_MASK_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def mc_dropout(net: nn.Module, noise: MemberNoise | None, *, batch_masks: bool = True) -> Iterator[nn.Module]:
    """Switch every dropout layer of `net` on (MC dropout), leaving the other layers' mode alone.

    With `noise` (one key per batch row), row b's mask in layer `l` is
    `noise.fold(l).bernoulli_keep(x.shape[1:], p)[b]`: reproducible from the member's key, independent of
    batching. The same `noise` gives the same masks on every call inside one context, so a caller that
    needs independent draws per call (e.g. the two interpolator calls of one cold-sampling update)
    passes `noise.fold(call_index)` in a fresh context per call. With `noise=None` masks come from
    torch's global RNG. Contexts nest; the previous state is restored on exit.

    `batch_masks` (eager calls): draw a call's masks together (`_MaskPlan`, learnt on the first call with a
    given input shape) rather than one layer at a time; the masks are bit for bit the same either way.
    """
    layers = _dropout_layers(net)
    masks = None
    if noise is not None:
        device = next((p.device for p in net.parameters()), noise.keys.device)
        noise = MemberNoise(noise.keys.to(device))
        if batch_masks:
            plan = _MASK_PLANS.get(net)
            if plan is None:
                plan = _MASK_PLANS[net] = _MaskPlan()
            masks = _ContextMasks(noise, plan)
    previous = [(layer.forced_on, layer.noise, layer.masks) for layer in layers]
    for layer in layers:
        layer.forced_on, layer.noise, layer.masks = True, noise, masks
    try:
        yield net
    finally:
        for layer, (forced_on, old_noise, old_masks) in zip(layers, previous):
            layer.forced_on, layer.noise, layer.masks = forced_on, old_noise, old_masks
        if masks is not None:
            masks.finish()


# --------------------------------------------------------------------------------------------------------
# Time conditioning and input handling shared by the three backbones
# --------------------------------------------------------------------------------------------------------


class SinusoidalEmbedding(nn.Module):
    """(B,) raw times -> (B, dim) features `[sin(t f_j), cos(t f_j)]`, f_j = exp(-j ln(10000) / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding needs an even dim >= 4, got {dim}")
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(torch.arange(half, device=time.device) * -(math.log(10000) / (half - 1)))
        angles = time[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def _time_embedding(dim: int) -> nn.Module:
    """Sinusoid then the 2-layer MLP; output (B, 2*dim)."""
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 2 * dim))


class FiLM(nn.Module):
    """`x * (1 + scale) + shift`, with (scale, shift) = Linear(SiLU(time features)) per channel."""

    def __init__(self, time_dim: int, channels: int):
        super().__init__()
        self.project = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * channels))

    def forward(self, x: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        scale, shift = self.project(time_features)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


def _film(time_dim: int | None, channels: int) -> FiLM | None:
    return FiLM(time_dim, channels) if time_dim else None


def _apply_film(film: FiLM | None, x: torch.Tensor, time_features: torch.Tensor | None) -> torch.Tensor:
    return x if film is None else film(x, time_features)


def _embed_time(embedding: nn.Module | None, time: torch.Tensor | float | None, batch: int,
                device: torch.device) -> torch.Tensor | None:
    """(B, 2*dim) time features, or None for a network built without time."""
    if embedding is None:
        return None
    if time is None:
        raise ValueError("this network was built with a time embedding: pass time as a (B,) tensor")
    time = torch.as_tensor(time, dtype=torch.float32, device=device)
    if time.ndim == 0:
        time = time.expand(batch)
    if time.shape != (batch,):
        raise ValueError(f"time must have shape ({batch},), got {tuple(time.shape)}")
    return embedding(time)


def _join_inputs(x: torch.Tensor, cond: torch.Tensor | None, in_channels: int, cond_channels: int,
                 *, cond_first: bool) -> torch.Tensor:
    """Check shapes and concatenate the condition channels at the input."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected x of shape (B, {in_channels}, Y, X), got {tuple(x.shape)}")
    given = 0 if cond is None else cond.shape[1]
    if given != cond_channels:
        raise ValueError(f"network expects {cond_channels} condition channels, got {given}")
    if cond_channels == 0:
        return x
    if cond.shape[0] != x.shape[0] or cond.shape[2:] != x.shape[2:]:
        raise ValueError(f"cond of shape {tuple(cond.shape)} does not match x of shape {tuple(x.shape)}")
    return torch.cat((cond, x) if cond_first else (x, cond), dim=1)


# --------------------------------------------------------------------------------------------------------
# "unet": the SST Unet
# --------------------------------------------------------------------------------------------------------


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv whose kernel is standardised per output channel (zero mean, unit variance) at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (weight - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each pixel, with a gain and no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.gain


class ResnetBlock(nn.Module):
    """Two (WS-conv 3x3 -> GroupNorm -> [FiLM] -> SiLU -> dropout) blocks plus a residual; FiLM on the first."""

    def __init__(self, in_channels: int, out_channels: int, *, time_dim: int | None, groups: int,
                 dropout1: float, dropout2: float):
        super().__init__()
        self.conv1 = WeightStandardizedConv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.film = _film(time_dim, out_channels)
        self.dropout1 = MemberDropout(dropout1)
        self.conv2 = WeightStandardizedConv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout2 = MemberDropout(dropout2)
        self.residual = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_features: torch.Tensor | None) -> torch.Tensor:
        h = _apply_film(self.film, self.norm1(self.conv1(x)), time_features)
        h = self.dropout1(F.silu(h))
        h = self.dropout2(F.silu(self.norm2(self.conv2(h))))
        return h + self.residual(x)


class LinearAttention(nn.Module):
    """Linear attention over pixels (q softmaxed over channels, k over pixels); dropout on the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.dropout = MemberDropout(dropout)
        self.to_qkv = nn.Conv2d(channels, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        qkv = self.to_qkv(self.dropout(x)).reshape(batch, 3, self.heads, self.dim_head, height * width)
        q, k, v = qkv.unbind(dim=1)  # each (B, heads, dim_head, pixels)
        q = q.softmax(dim=-2) * self.dim_head**-0.5
        k = k.softmax(dim=-1)
        v = v / (height * width)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(batch, self.heads * self.dim_head, height, width))


class Attention(nn.Module):
    """Full softmax attention over pixels; dropout on the attention probabilities."""

    def __init__(self, channels: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * heads * dim_head, 1, bias=False)
        self.dropout = MemberDropout(dropout)
        self.to_out = nn.Conv2d(heads * dim_head, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        qkv = self.to_qkv(x).reshape(batch, 3, self.heads, self.dim_head, height * width)
        q, k, v = qkv.unbind(dim=1)
        similarity = torch.einsum("bhdi,bhdj->bhij", q * self.dim_head**-0.5, k)
        attention = self.dropout(similarity.softmax(dim=-1))
        out = torch.einsum("bhij,bhdj->bhdi", attention, v)
        return self.to_out(out.reshape(batch, self.heads * self.dim_head, height, width))


class PreNormResidual(nn.Module):
    """`x + fn(ChannelLayerNorm(x))`."""

    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))


class _UnetLevel(nn.Module):
    """Two ResNet blocks, linear attention, then a resampling conv (down or up, or a 3x3 conv)."""

    def __init__(self, block1: nn.Module, block2: nn.Module, attention: nn.Module, resample: nn.Module):
        super().__init__()
        self.block1, self.block2, self.attention, self.resample = block1, block2, attention, resample


class Unet(nn.Module):
    """The SST `Unet`; see the module docstring. Dropout rates of the paper's SST interpolator: block 0.6,
    block1 0.2, attention 0.6; forecaster: 0.3, 0.0, 0.1."""

    def __init__(self, *, in_channels: int, cond_channels: int, out_channels: int, with_time: bool,
                 dim: int = 64, dim_mults: Sequence[int] = (1, 2, 4), groups: int = 8,
                 block_dropout: float = 0.0, block_dropout1: float = 0.0, attn_dropout: float = 0.0,
                 attn_heads: int = 4, attn_dim_head: int = 32, init_kernel_size: int = 7,
                 pad_mode: str = "replicate", periodic_x: bool = False):
        super().__init__()
        if pad_mode not in ("replicate", "zeros"):
            raise ValueError(f"pad_mode must be 'replicate' or 'zeros', got {pad_mode!r}")
        if not dim_mults or init_kernel_size % 2 == 0:
            raise ValueError("unet needs at least one dim_mult and an odd init_kernel_size")
        self.in_channels, self.cond_channels, self.out_channels = in_channels, cond_channels, out_channels
        self.pad_mode, self.periodic_x = pad_mode, bool(periodic_x)
        self.multiple = 2 ** (len(dim_mults) - 1)
        time_dim = 2 * dim if with_time else None
        self.time_embedding = _time_embedding(dim) if with_time else None

        def block(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, time_dim=time_dim, groups=groups, dropout1=block_dropout1,
                               dropout2=block_dropout)

        def linear_attention(channels: int) -> PreNormResidual:
            return PreNormResidual(channels, LinearAttention(channels, attn_heads, attn_dim_head, attn_dropout))

        self.init_conv = nn.Conv2d(in_channels + cond_channels, dim, init_kernel_size,
                                   padding=init_kernel_size // 2)
        dims = [dim, *(dim * m for m in dim_mults)]
        pairs = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList()
        for level, (cin, cout) in enumerate(pairs):
            last = level == len(pairs) - 1
            resample = nn.Conv2d(cin, cout, 3, padding=1) if last else nn.Conv2d(cin, cout, 4, 2, 1)
            self.downs.append(_UnetLevel(block(cin, cin), block(cin, cin), linear_attention(cin), resample))
        self.mid_block1 = block(dims[-1], dims[-1])
        self.mid_attention = PreNormResidual(dims[-1], Attention(dims[-1], attn_heads, attn_dim_head, attn_dropout))
        self.mid_block2 = block(dims[-1], dims[-1])
        self.ups = nn.ModuleList()
        for level, (cin, cout) in enumerate(reversed(pairs)):
            last = level == len(pairs) - 1
            resample = (nn.Conv2d(cout, cin, 3, padding=1) if last else
                        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cin, 3, padding=1)))
            self.ups.append(_UnetLevel(block(cout + cin, cout), block(cout + cin, cout), linear_attention(cout),
                                       resample))
        self.final_block = block(2 * dim, dim)
        self.final_conv = nn.Conv2d(dim, out_channels, 1)
        _number_dropout_layers(self)
        if self.periodic_x:
            wrap_x_padding(self)

    def forward(self, x: torch.Tensor, time: torch.Tensor | float | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Cin, Y, X), time (B,), cond (B, Ccond, Y, X) -> (B, Cout, Y, X)."""
        x = _join_inputs(x, cond, self.in_channels, self.cond_channels, cond_first=True)
        height, width = x.shape[-2:]
        t = _embed_time(self.time_embedding, time, x.shape[0], x.device)
        x = self.init_conv(self._pad(x))
        long_skip = x
        skips = []
        for level in self.downs:
            x = level.block1(x, t)
            skips.append(x)
            x = level.attention(level.block2(x, t))
            skips.append(x)
            x = level.resample(x)
        x = self.mid_block2(self.mid_attention(self.mid_block1(x, t)), t)
        for level in self.ups:
            x = level.block1(torch.cat((x, skips.pop()), dim=1), t)
            x = level.block2(torch.cat((x, skips.pop()), dim=1), t)
            x = level.resample(level.attention(x))
        x = self.final_conv(self.final_block(torch.cat((x, long_skip), dim=1), t))
        return x[..., :height, :width]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right so each downsampling halves the grid exactly (x wraps around when periodic)."""
        pad_y, pad_x = -x.shape[-2] % self.multiple, -x.shape[-1] % self.multiple
        if self.periodic_x and pad_x:
            x, pad_x = F.pad(x, (0, pad_x, 0, 0), mode="circular"), 0
        if not (pad_y or pad_x):
            return x
        if self.pad_mode == "zeros":
            return F.pad(x, (0, pad_x, 0, pad_y))
        return F.pad(x, (0, pad_x, 0, pad_y), mode="replicate")


# --------------------------------------------------------------------------------------------------------
# "unet-ns": the Navier-Stokes UNet
# --------------------------------------------------------------------------------------------------------


class _NavierStokesBlock(nn.Module):
    """Encoder: stride-2 conv; decoder: bilinear x2 then conv (kernel size-1). Then norm, FiLM, act, dropout."""

    def __init__(self, in_channels: int, out_channels: int, *, decoder: bool, size: int, pad: int,
                 batch_norm: bool, time_dim: int | None, dropout: float):
        super().__init__()
        if decoder:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                                          nn.Conv2d(in_channels, out_channels, size - 1, 1, pad))
        else:
            self.resample = nn.Conv2d(in_channels, out_channels, size, 2, pad)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.GroupNorm(8, out_channels)
        self.film = _film(time_dim, out_channels)
        self.activation = nn.ReLU() if decoder else nn.LeakyReLU(0.2)
        self.dropout = MemberDropout(dropout)

    def forward(self, x: torch.Tensor, time_features: torch.Tensor | None) -> torch.Tensor:
        x = _apply_film(self.film, self.norm(self.resample(x)), time_features)
        return self.dropout(self.activation(x))


class NavierStokesUNet(nn.Module):
    """The NS `UNet`; see the module docstring. Paper dropout: 0.15 (interpolator and forecaster)."""

    def __init__(self, *, in_channels: int, cond_channels: int, out_channels: int, with_time: bool,
                 dim: int = 64, dropout: float = 0.0, resample_size: Sequence[int] = (256, 256),
                 resample_mode: str = "bilinear"):
        super().__init__()
        resample_size = tuple(int(s) for s in resample_size)
        if len(resample_size) != 2 or any(s <= 0 or s % 64 for s in resample_size):
            raise ValueError(f"resample_size must be two positive multiples of 64 (six halvings), "
                             f"got {resample_size}")
        if resample_mode not in ("bilinear", "nearest"):
            raise ValueError(f"resample_mode must be 'bilinear' or 'nearest', got {resample_mode!r}")
        self.in_channels, self.cond_channels, self.out_channels = in_channels, cond_channels, out_channels
        self.resample_size, self.resample_mode = resample_size, resample_mode
        time_dim = 2 * dim if with_time else None
        self.time_embedding = _time_embedding(dim) if with_time else None
        self.init_conv = nn.Conv2d(in_channels + cond_channels, dim, 1)
        d = dim
        # (in, out, kernel size, padding, batch norm) per block, from the reference.
        encoder = [(d, 2 * d, 4, 1, True), (2 * d, 2 * d, 4, 1, True), (2 * d, 4 * d, 4, 1, True),
                   (4 * d, 8 * d, 4, 1, True), (8 * d, 8 * d, 2, 0, True), (8 * d, 8 * d, 2, 0, False)]
        decoder = [(8 * d, 8 * d, 2, 0), (16 * d, 8 * d, 2, 0), (16 * d, 4 * d, 4, 1),
                   (8 * d, 2 * d, 4, 1), (4 * d, 2 * d, 4, 1), (4 * d, d, 4, 1)]
        self.encoder = nn.ModuleList(
            _NavierStokesBlock(cin, cout, decoder=False, size=size, pad=pad, batch_norm=bn, time_dim=time_dim,
                               dropout=dropout) for cin, cout, size, pad, bn in encoder)
        self.decoder = nn.ModuleList(
            _NavierStokesBlock(cin, cout, decoder=True, size=size, pad=pad, batch_norm=True, time_dim=time_dim,
                               dropout=dropout) for cin, cout, size, pad in decoder)
        self.readout = nn.ConvTranspose2d(dim, out_channels, 4, 2, 1)
        self.apply(_navier_stokes_init)
        _number_dropout_layers(self)

    def forward(self, x: torch.Tensor, time: torch.Tensor | float | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Cin, Y, X), time (B,), cond (B, Ccond, Y, X) -> (B, Cout, Y, X)."""
        x = _join_inputs(x, cond, self.in_channels, self.cond_channels, cond_first=False)
        grid = tuple(x.shape[-2:])
        t = _embed_time(self.time_embedding, time, x.shape[0], x.device)
        x = self.init_conv(F.interpolate(x, size=self.resample_size, mode=self.resample_mode))
        skips = []
        for block in self.encoder:
            x = block(x, t)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(x, t)
            if skips:
                x = torch.cat((x, skips.pop()), dim=1)
        return F.interpolate(self.readout(x), size=grid, mode=self.resample_mode)


def _navier_stokes_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------------
# "cnn": the spring-mesh SimpleConvNet
# --------------------------------------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    """Same-padded conv -> BatchNorm -> FiLM -> GELU -> dropout, plus the input when channels match."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, residual: bool,
                 time_dim: int | None, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels)
        self.film = _film(time_dim, out_channels)
        self.dropout = MemberDropout(dropout)
        self.residual = residual and in_channels == out_channels

    def forward(self, x: torch.Tensor, time_features: torch.Tensor | None) -> torch.Tensor:
        h = _apply_film(self.film, self.norm(self.conv(x)), time_features)
        h = self.dropout(F.gelu(h))
        return h + x if self.residual else h


class SimpleConvNet(nn.Module):
    """The spring-mesh `SimpleConvNet`; see the module docstring. Paper dropout: 0.05 for the interpolator,
    0.0 for the forecaster."""

    def __init__(self, *, in_channels: int, cond_channels: int, out_channels: int, with_time: bool,
                 dim: int = 64, kernel_sizes: Sequence[int] = (9, 7, 5, 3), dropout: float = 0.0,
                 residual: bool = True, periodic_x: bool = False):
        super().__init__()
        if not kernel_sizes or any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"cnn kernel_sizes must be odd (same padding), got {list(kernel_sizes)}")
        self.in_channels, self.cond_channels, self.out_channels = in_channels, cond_channels, out_channels
        time_dim = 2 * dim if with_time else None
        self.time_embedding = _time_embedding(dim) if with_time else None
        widths = [in_channels + cond_channels] + [dim] * len(kernel_sizes)
        self.blocks = nn.ModuleList(
            _ConvBlock(cin, dim, k, residual=residual, time_dim=time_dim, dropout=dropout)
            for cin, k in zip(widths[:-1], kernel_sizes))
        self.head = nn.Conv2d(dim, out_channels, 1)
        _number_dropout_layers(self)
        if periodic_x:
            wrap_x_padding(self)

    def forward(self, x: torch.Tensor, time: torch.Tensor | float | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Cin, Y, X), time (B,), cond (B, Ccond, Y, X) -> (B, Cout, Y, X)."""
        x = _join_inputs(x, cond, self.in_channels, self.cond_channels, cond_first=False)
        t = _embed_time(self.time_embedding, time, x.shape[0], x.device)
        for block in self.blocks:
            x = block(x, t)
        return self.head(x)


# --------------------------------------------------------------------------------------------------------
# Periodic longitude
# --------------------------------------------------------------------------------------------------------


def wrap_x_padding(net: nn.Module) -> nn.Module:
    """Make every padded `nn.Conv2d` of `net` pad x circularly (y keeps its zero padding); returns `net`.

    Done after construction on every convolution at once, so no padded convolution of a network can be
    missed. The conv's own x padding is set to 0 and a forward pre-hook wraps `padding[1]` columns from
    the other side around the input first; weights and parameter names are unchanged.
    """
    for conv in net.modules():
        if isinstance(conv, nn.Conv2d) and not isinstance(conv.padding, str) and conv.padding[1] > 0:
            if conv.padding_mode != "zeros":
                raise ValueError(f"cannot wrap the x padding of a conv with padding_mode={conv.padding_mode!r}")
            conv.wrap_x = conv.padding[1]
            conv.padding = (conv.padding[0], 0)
            conv.register_forward_pre_hook(_pad_x_circularly)
    return net


def _pad_x_circularly(conv: nn.Conv2d, inputs: tuple) -> tuple:
    return (F.pad(inputs[0], (conv.wrap_x, conv.wrap_x, 0, 0), mode="circular"), *inputs[1:])


def supports_periodic_x(kind: str) -> bool:
    """Whether networks of `kind` can be built with `periodic_x=True`."""
    return "periodic_x" in hyperparameters(kind)


# --------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[nn.Module]] = {"unet": Unet, "unet-ns": NavierStokesUNet, "cnn": SimpleConvNet}


def hyperparameters(kind: str) -> dict[str, object]:
    """The keyword hyperparameters `kind` accepts, with their defaults (the paper's settings, dropout 0)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown network kind {kind!r}; choose one of {', '.join(KINDS)}")
    signature = inspect.signature(_CLASSES[kind].__init__)
    fixed = {"self", "in_channels", "cond_channels", "out_channels", "with_time"}
    return {name: p.default for name, p in signature.parameters.items() if name not in fixed}


def build_network(kind: str, *, in_channels: int, cond_channels: int, out_channels: int,
                  with_time: bool = True, **hyper) -> nn.Module:
    """Build a backbone: `kind` in KINDS; `hyper` overrides the defaults listed by `hyperparameters(kind)`.

    Channel counts: `in_channels` state channels (e.g. 2C for the interpolator's `[x_0, x_h]`),
    `cond_channels` static/forward-conditioning channels concatenated at the input, `out_channels` outputs.
    """
    unknown = sorted(set(hyper) - set(hyperparameters(kind)))
    if unknown:
        raise ValueError(f"{kind} network has no hyperparameter {', '.join(unknown)}; "
                         f"accepted: {', '.join(hyperparameters(kind))}")
    if in_channels < 1 or cond_channels < 0 or out_channels < 1:
        raise ValueError(f"channel counts must be in >= 1, cond >= 0, out >= 1; got "
                         f"{in_channels}, {cond_channels}, {out_channels}")
    return _CLASSES[kind](in_channels=in_channels, cond_channels=cond_channels, out_channels=out_channels,
                          with_time=with_time, **hyper)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
