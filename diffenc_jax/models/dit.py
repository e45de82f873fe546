"""A z-conditioned transformer denoiser (DiT-style): matmul-bound, fast on CPUs and accelerators.

Images are cut into non-overlapping p×p patches, each patch a token; the tokens pass through
`depth` transformer blocks whose LayerNorms are modulated by the conditioning
c = MLP(time) + MLP(z) through adaLN-Zero (shift, scale and a residual gate per sub-layer, all
from one zero-initialised Dense of SiLU(c), so that every block starts as the identity); a
final modulated LayerNorm and a zero-initialised linear map give each token's p·p·C outputs,
which are put back together into an image. At init the network outputs exactly 0.

Cost: (H/p)(W/p) tokens of width `width`. On a 28×28 digit with p = 7 that is 16 tokens; the
whole network is a handful of (B·16, width) matmuls, which XLA:CPU runs far faster than the
U-Net's convolutions on small maps.
"""

from __future__ import annotations

from typing import Sequence

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax.models.layers import TimeEmbedding, zeros_init

DTYPES = ("float32", "bfloat16")


def patchify(x, p: int):
  """(B, H, W, C) → (B, (H/p)(W/p), p·p·C), tokens in row-major patch order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, image_shape: Sequence[int], p: int):
  """The inverse of `patchify`: (B, (H/p)(W/p), p·p·C) → (B, H, W, C)."""
  h, w, c = image_shape
  b = tokens.shape[0]
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def sincos_positions(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (grid_h·grid_w, dim), half the channels per axis."""
  def one_axis(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / max(d // 2, 1))
    args = pos[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  gy, gx = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                       indexing="ij")
  half = dim // 2
  emb = np.concatenate([one_axis(gy.reshape(-1), half), one_axis(gx.reshape(-1), dim - half)], 1)
  return emb.astype(np.float32)


def _modulate(h, shift, scale):
  """h (B·T, W) of B examples' T tokens, each example's tokens shifted and scaled by its own
  (B, W) rows: h (1 + scale) + shift."""
  b, w = shift.shape
  return (h.reshape(b, -1, w) * (1.0 + scale[:, None, :]) + shift[:, None, :]).reshape(h.shape)


def _gate(x, gate, h):
  """The gated residual x + gate · h of (B·T, W) tokens, gate (B, W) per example."""
  b, w = gate.shape
  return x + (gate[:, None, :] * h.reshape(b, -1, w)).reshape(x.shape)


def _dot_general_f32(*args, **kwargs):
  """lax.dot_general accumulating and returning float32 (for bfloat16 operands)."""
  return jax.lax.dot_general(*args, **kwargs, preferred_element_type=jnp.float32)


def _layer_norm(x):
  """LayerNorm over the last axis without scale or bias."""
  return nn.LayerNorm(use_scale=False, use_bias=False).apply({}, x)


def attention(q, k, v):
  """Softmax attention of every token to every token: q, k, v (B, T, heads, D) → (B, T, heads, D);
  queries scaled by 1/√D first."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
                    .astype(v.dtype), v)


class QKV(nn.Module):
  """Queries, keys and values of B examples' tokens h (B·T, W) from one (W, 3W) kernel and (3W,)
  bias (queries, keys, values in that order along the 3W outputs, heads in order within each):
  three (B, T, heads, W/heads) arrays, each one matmul with a slice of the kernel."""

  num_heads: int
  batch: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, h):
    w = h.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (w, 3 * w))
    bias = self.param("bias", nn.initializers.zeros, (3 * w,))
    h = h.astype(self.dtype)
    shape = (self.batch, -1, self.num_heads, w // self.num_heads)
    return tuple((jnp.dot(h, kernel[:, i * w:(i + 1) * w].astype(self.dtype),
                          preferred_element_type=jnp.float32) + bias[i * w:(i + 1) * w])
                 .reshape(shape) for i in range(3))


class DiTBlock(nn.Module):
  """x (B·T, W) ← x + g₁·Attn(LN(x)(1+s₁)+b₁) then x + g₂·MLP(LN(x)(1+s₂)+b₂), given this
  block's modulation `mods` = (b₁, s₁, g₁, b₂, s₂, g₂) (B, 6W) (adaLN-Zero, computed for all
  blocks at once by `DiTDenoiser`).

  Attention: `QKV`, `attention`, then Dense(W) `proj`; MLP: Dense `mlp_in` → tanh GELU → Dense
  `mlp_out`. Matmuls run in `dtype` (float32 or bfloat16, accumulating in float32); LayerNorm,
  softmax and the residual stream stay float32.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mods):
    n, w = x.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=_dot_general_f32)
    b1, s1, g1, b2, s2, g2 = jnp.split(mods, 6, axis=-1)
    h = _modulate(_layer_norm(x), b1, s1)
    h = attention(*QKV(self.num_heads, mods.shape[0], self.dtype, name="qkv")(h))
    x = _gate(x, g1, dense(w, name="proj")(h.reshape(n, w)))
    h = _modulate(_layer_norm(x), b2, s2)
    h = dense(int(self.mlp_ratio * w), name="mlp_in")(h)
    return _gate(x, g2, dense(w, name="mlp_out")(nn.gelu(h)))


class DiTDenoiser(nn.Module):
  """z-conditioned transformer denoiser f_θ(x_t, t, z): x_t (B, H, W, C), t (B,), z (B, d) →
  (B, H, W, C), the raw prediction (ε, v or x₀: the decoder's parameterisation decides).

  H and W must be multiples of `patch_size`. Conditioning: c = TimeEmbedding(t) +
  Dense(SiLU(Dense(z))), the sum of a time MLP and a z MLP, modulating every block by
  adaLN-Zero; positions are fixed 2-D sine-cosine embeddings added to the patch projection.
  The modulations of all blocks and of the final LayerNorm come from one zero-initialised
  Dense `adaln` of SiLU(c), (B, (6·depth + 2)·W): block i's (b₁, s₁, g₁, b₂, s₂, g₂) are its
  columns [6iW, 6(i+1)W), the final (shift, scale) the last 2W. `dtype` is the matmuls'
  (float32 or bfloat16; parameters are float32 either way).
  """

  image_shape: Sequence[int] = (28, 28, 1)
  patch_size: int = 7
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  latent_dim: int | None = None  # if set, z's last dimension is checked against it
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_t, t, z, train: bool = False):
    del train  # no dropout
    h_img, w_img, _ = self.image_shape
    p, w = self.patch_size, self.width
    if h_img % p or w_img % p:
      raise ValueError(f"image size {h_img}×{w_img} is not a multiple of patch_size {p}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
    chex.assert_shape(x_t, (None, *self.image_shape))
    chex.assert_shape(t, (x_t.shape[0],))
    chex.assert_shape(z, (x_t.shape[0], self.latent_dim))

    c = TimeEmbedding(w)(t)
    c = c + nn.Dense(w)(nn.silu(nn.Dense(w, name="z_proj")(z)))
    mods = nn.Dense((6 * self.depth + 2) * w, kernel_init=zeros_init, name="adaln")(nn.silu(c))
    # tokens as one (B·T, W) matrix: XLA:CPU's matmuls (and their gradients, which contract over
    # B·T) run markedly faster on 2-D operands than with B and T as separate axes
    b, n = x_t.shape[0], (h_img // p) * (w_img // p)
    tokens = nn.Dense(w, name="patch_proj")(patchify(x_t, p).reshape(b * n, -1))
    tokens = (tokens.reshape(b, n, w) + sincos_positions(h_img // p, w_img // p, w)[None])
    tokens = tokens.reshape(b * n, w)
    for i in range(self.depth):
      tokens = DiTBlock(self.num_heads, self.mlp_ratio, self.dtype, name=f"DiTBlock_{i}")(
          tokens, mods[:, 6 * i * w:6 * (i + 1) * w])
    shift, scale = jnp.split(mods[:, 6 * self.depth * w:], 2, axis=-1)
    tokens = _modulate(_layer_norm(tokens), shift, scale)
    out = nn.Dense(p * p * self.image_shape[-1], kernel_init=zeros_init, name="out")(tokens)
    return unpatchify(out.reshape(b, n, -1), self.image_shape, p)


def params_from_separate_projections(params, depth: int):
  """Parameters of the earlier layout (per block: an `adaln` Dense, a
  nn.MultiHeadDotProductAttention `attn` with query/key/value/out, MLP Dense_0/Dense_1; a
  `final_adaln` Dense) in this module's layout: the same function, the same numbers.

  `params` is the module's 'params' collection (a checkpoint of a DiT decoder from before the
  fused layout); the result is what `DiTDenoiser.apply` takes now.
  """
  out = {k: v for k, v in params.items()
         if not k.startswith("DiTBlock_") and k != "final_adaln"}
  kernels, biases = [], []
  for i in range(depth):
    old = params[f"DiTBlock_{i}"]
    attn = old["attn"]
    w = attn["out"]["kernel"].shape[-1]
    qkv_k = jnp.concatenate([attn[n]["kernel"].reshape(w, w) for n in ("query", "key", "value")],
                            axis=1)
    qkv_b = jnp.concatenate([attn[n]["bias"].reshape(w) for n in ("query", "key", "value")])
    out[f"DiTBlock_{i}"] = {
        "qkv": {"kernel": qkv_k, "bias": qkv_b},
        "proj": {"kernel": attn["out"]["kernel"].reshape(w, w), "bias": attn["out"]["bias"]},
        "mlp_in": dict(old["Dense_0"]), "mlp_out": dict(old["Dense_1"])}
    kernels.append(old["adaln"]["kernel"])
    biases.append(old["adaln"]["bias"])
  kernels.append(params["final_adaln"]["kernel"])
  biases.append(params["final_adaln"]["bias"])
  out["adaln"] = {"kernel": jnp.concatenate(kernels, axis=1), "bias": jnp.concatenate(biases)}
  return out
