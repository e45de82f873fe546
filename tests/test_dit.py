"""The transformer denoiser's fused layout computes the same function as the earlier layout
(per-block adaLN Dense, flax's MultiHeadDotProductAttention, (B, T, W) tokens), written out below
as it was: outputs, losses and gradients agree to float32 rounding once the earlier parameters
are mapped by `dit.params_from_separate_projections`; bfloat16 matmuls stay close to it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax.models import dit
from diffenc_jax.models.layers import TimeEmbedding, zeros_init


def _modulate(h, shift, scale):
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class EarlierBlock(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x, c):
    w = x.shape[-1]
    mods = nn.Dense(6 * w, kernel_init=zeros_init, name="adaln")(nn.silu(c))
    b1, s1, g1, b2, s2, g2 = jnp.split(mods, 6, axis=-1)
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(x), b1, s1)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=w,
                                        out_features=w, name="attn")(h, h)
    x = x + g1[:, None, :] * h
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(x), b2, s2)
    h = nn.Dense(4 * w)(h)
    h = nn.Dense(w)(nn.gelu(h))
    return x + g2[:, None, :] * h


class EarlierDiT(nn.Module):
  image_shape: tuple = (28, 28, 1)
  patch_size: int = 7
  width: int = 32
  depth: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, x_t, t, z):
    h_img, w_img, _ = self.image_shape
    p = self.patch_size
    c = TimeEmbedding(self.width)(t)
    c = c + nn.Dense(self.width)(nn.silu(nn.Dense(self.width, name="z_proj")(z)))
    tokens = nn.Dense(self.width, name="patch_proj")(dit.patchify(x_t, p))
    tokens = tokens + dit.sincos_positions(h_img // p, w_img // p, self.width)[None]
    for i in range(self.depth):
      tokens = EarlierBlock(self.num_heads, name=f"DiTBlock_{i}")(tokens, c)
    shift, scale = jnp.split(nn.Dense(2 * self.width, kernel_init=zeros_init,
                                      name="final_adaln")(nn.silu(c)), 2, axis=-1)
    tokens = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(tokens), shift, scale)
    out = nn.Dense(p * p * self.image_shape[-1], kernel_init=zeros_init, name="out")(tokens)
    return dit.unpatchify(out, self.image_shape, p)


def _setup(width=32, depth=2, heads=4, batch=5, dtype="float32"):
  earlier = EarlierDiT(width=width, depth=depth, num_heads=heads)
  fused = dit.DiTDenoiser(image_shape=(28, 28, 1), patch_size=7, width=width, depth=depth,
                          num_heads=heads, latent_dim=3, dtype=dtype)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (batch, 28, 28, 1))
  t = jax.random.uniform(keys[1], (batch,))
  z = jax.random.normal(keys[2], (batch, 3))
  target = jax.random.normal(keys[3], (batch, 28, 28, 1))
  params = earlier.init(keys[4], x, t, z)["params"]
  # move every weight (the zero-initialised adaLN and output ones too) so that all paths count
  leaves, tree = jax.tree.flatten(params)
  noise = jax.random.split(keys[5], len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)])
  return earlier, fused, params, (x, t, z, target)


def test_fused_layout_has_the_earlier_parameter_count_and_shapes():
  earlier, fused, params, (x, t, z, _) = _setup()
  mapped = dit.params_from_separate_projections(params, depth=2)
  own = fused.init(jax.random.key(1), x, t, z)["params"]
  assert jax.tree.map(jnp.shape, mapped) == jax.tree.map(jnp.shape, own)
  count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))  # noqa: E731
  assert count(mapped) == count(params) == count(own)


def test_fused_layout_matches_the_earlier_module_in_value_loss_and_gradient():
  earlier, fused, params, (x, t, z, target) = _setup()
  mapped = dit.params_from_separate_projections(params, depth=2)
  out_a = earlier.apply({"params": params}, x, t, z)
  out_b = fused.apply({"params": mapped}, x, t, z)
  assert float(jnp.std(out_a)) > 0.1  # a network that does something
  np.testing.assert_allclose(out_b, out_a, rtol=2e-5, atol=2e-5)

  def loss(module):
    return lambda p: jnp.mean((module.apply({"params": p}, x, t, z) - target) ** 2)
  la, ga = jax.value_and_grad(loss(earlier))(params)
  lb, gb = jax.value_and_grad(loss(fused))(mapped)
  np.testing.assert_allclose(lb, la, rtol=1e-6)
  # the mapping is a re-layout (reshapes and concatenations), so it maps gradients too
  ga = dit.params_from_separate_projections(ga, depth=2)
  for path, a in jax.tree_util.tree_flatten_with_path(ga)[0]:
    b = gb
    for key in path:
      b = b[key.key]
    scale = float(jnp.max(jnp.abs(a)))
    assert scale > 0, path  # every parameter receives a gradient
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


def test_bfloat16_matmuls_stay_close_and_keep_float32_parameters():
  _, fused, params, (x, t, z, _) = _setup()
  mapped = dit.params_from_separate_projections(params, depth=2)
  half = dit.DiTDenoiser(image_shape=(28, 28, 1), patch_size=7, width=32, depth=2, num_heads=4,
                         latent_dim=3, dtype="bfloat16")
  assert all(a.dtype == jnp.float32
             for a in jax.tree.leaves(half.init(jax.random.key(1), x, t, z)))
  full, low = fused.apply({"params": mapped}, x, t, z), half.apply({"params": mapped}, x, t, z)
  assert low.dtype == jnp.float32
  err = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
  assert 1e-4 < err < 3e-2  # bfloat16's 8-bit mantissa: visibly rounded, still the same function


def test_unknown_dtype_is_rejected():
  net = dit.DiTDenoiser(width=8, depth=1, num_heads=1, dtype="float16")
  with pytest.raises(ValueError, match="float16"):
    net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1, 2)))
