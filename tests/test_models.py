"""Tests for diffenc_jax.models: shapes, jit, gradients, z-dependence, independence, relaxations.

XLA compilation dominates the runtime on CPU, so each model configuration is checked by one
jitted function where possible (compiled with cheap options, see `jit`), and parameters are
either drawn on the host with numpy (`random_params`) or initialised with an 'rbg' key:
threefry-based init compiles ~5× slower.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax.models import (ConvEncoder, LatentDenoiser, MeanDecoder, MeanLogVarEncoder,
                                ResNetEncoder, UNetDecoder, hard_bernoulli, relaxed_bernoulli)
from diffenc_jax.models.layers import AttentionBlock, sinusoidal_embedding

# The test programs are tiny, so XLA compile time dominates the runtime: on CPU, -O0 without
# the fusion emitters compiles a small U-Net's gradient ~4× faster (and runs ~1.5× slower).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_cpu_use_fusion_emitters": False})
KEY = jax.random.key(0, impl="rbg")
B, D = 3, 4  # batch, latent dim
IMAGE_SHAPES = [(28, 28, 1), (32, 32, 3)]


def randn(i, shape):
  return jnp.asarray(np.random.default_rng(i).normal(size=shape), jnp.float32)


def random_params(model, *args):
  """Parameters of model.init(…, *args) with every leaf random, zero-init layers included.

  Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1²), biases ~ N(0, 0.1²); drawn on the
  host, so no RNG program is compiled.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    shape = leaf.shape
    if len(shape) >= 2:
      return rng.normal(size=shape).astype(np.float32) / math.sqrt(np.prod(shape[:-1]))
    offset = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (offset + 0.1 * rng.normal(size=shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, KEY, *args))


def assert_grads_ok(grads):
  """All gradient leaves finite, and not all of them zero."""
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in leaves)


def assert_depends_on_z(out, d_out):
  """Examples 0 and 1 differ only in z: their outputs must differ; d_out, a derivative of
  the output w.r.t. each example's z (Jacobian, or gradient of a scalar), must be ≠ 0."""
  assert not np.allclose(out[0], out[1])
  assert np.all(np.isfinite(d_out))
  assert np.all(np.linalg.norm(d_out.reshape(out.shape[0], -1), axis=-1) > 0)


def test_sinusoidal_embedding():
  emb = sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]), 7)
  assert emb.shape == (3, 7)
  np.testing.assert_allclose(emb[0, :3], 1.0)  # cos(0)
  assert not np.allclose(emb[1], emb[2])


def test_attention_block():
  x = randn(0, (2, 4, 4, 8))
  block = AttentionBlock(num_heads=2)
  for context in (None, randn(1, (2, 3, 5))):  # self-attention; cross-attention to 3 tokens
    assert jit(block.apply)(random_params(block, x, context), x, context).shape == x.shape


def test_one_token_cross_attention_is_exact():
  """The closed form used for one token equals flax's multi-head attention to that token."""
  x, token = randn(0, (2, 4, 4, 8)), randn(1, (2, 1, 5))
  block = AttentionBlock()
  p = random_params(block, x, token)["params"]
  mha = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=8, out_features=8)
  q = randn(2, (2, 16, 8))
  mha_params = random_params(mha, q, token)  # random query and key projections
  mha_params["params"]["value"] = {"kernel": p["value"]["kernel"][:, None, :],
                                   "bias": p["value"]["bias"][None, :]}
  mha_params["params"]["out"] = {"kernel": p["out"]["kernel"][None], "bias": p["out"]["bias"]}
  expected = x + mha.apply(mha_params, q, token).reshape(x.shape)
  np.testing.assert_allclose(block.apply({"params": p}, x, token), expected, rtol=1e-5, atol=1e-5)


# --- latent denoiser ---------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", IMAGE_SHAPES + [(2,)])
def test_latent_denoiser(x_shape):
  model = LatentDenoiser(D, channels=(8, 16), feature_dim=32, hidden=32, num_blocks=2)
  x, z_t, t = randn(0, (B, *x_shape)), randn(1, (B, D)), jnp.array([0.1, 0.5, 0.9])
  apply = jit(model.apply)
  # Untrained: the zero-initialised output layer gives exactly ε̂ = 0.
  params = jit(model.init)(KEY, z_t, t, x)
  np.testing.assert_array_equal(apply(params, z_t, t, x), 0.0)

  params = random_params(model, z_t, t, x)
  eps = apply(params, z_t, t, x)
  assert eps.shape == (B, D)

  @jit
  def split_and_grads(params):
    h = model.apply(params, x, method="features")  # once per image
    eps = model.apply(params, z_t, t, h, method="denoise")
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, z_t, t, x) ** 2))(params)
    return h, eps, grads

  h, eps_split, grads = split_and_grads(params)
  assert h.shape == (B, 32)
  np.testing.assert_allclose(eps_split, eps, rtol=1e-5, atol=1e-6)
  assert_grads_ok(grads)
  # Per-example independence: changing example 2 leaves examples 0 and 1 unchanged.
  x2, z2, t2 = x.at[2].set(randn(2, x_shape)), z_t.at[2].add(1.0), t.at[2].set(0.3)
  eps2 = apply(params, z2, t2, x2)
  np.testing.assert_allclose(eps2[:2], eps[:2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(eps2[2], eps[2])


# --- encoders ----------------------------------------------------------------------------

ENCODER_CASES = [
    (MeanLogVarEncoder, (28, 28, 1)), (ConvEncoder, (28, 28, 1)),
    (MeanLogVarEncoder, (32, 32, 3)), (ConvEncoder, (32, 32, 3)),
    (MeanLogVarEncoder, (2,)), (ConvEncoder, (2,)),
]


@pytest.mark.parametrize("cls,x_shape", ENCODER_CASES)
def test_encoders(cls, x_shape):
  model = cls(D, channels=(8, 16), features=32)
  x = randn(0, (B, *x_shape))
  params = random_params(model, x)
  loss = lambda p: (lambda out: (sum(jnp.sum(o ** 2) for o in jax.tree.leaves(out)), out))(
      model.apply(p, x))
  (_, out), grads = jit(jax.value_and_grad(loss, has_aux=True))(params)
  if cls is MeanLogVarEncoder:
    assert out[0].shape == out[1].shape == (B, D)
  else:
    assert out.shape == (B, D)
  assert_grads_ok(grads)


def test_resnet_encoder():
  model = ResNetEncoder(D, channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(16,))
  x = randn(0, (B, 32, 32, 3))
  params = random_params(model, x)
  loss = lambda p: (lambda z: (jnp.sum(z ** 2), z))(model.apply(p, x))
  (_, z), grads = jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert z.shape == (B, D)
  assert_grads_ok(grads)


def test_resnet_encoder_expresses_diffae_64():
  model = ResNetEncoder(512, channels=64, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
                        attn_resolutions=(16,))
  x = jnp.zeros((1, 64, 64, 3))
  params = jax.eval_shape(model.init, KEY, x)
  assert jax.eval_shape(model.apply, params, x).shape == (1, 512)


def test_relaxed_bernoulli_mean_approaches_sigmoid():
  logits = jnp.array([-2.0, -0.3, 0.0, 0.7, 3.0])
  soft = relaxed_bernoulli(KEY, jnp.broadcast_to(logits, (20000, 5)), temperature=0.02)
  assert soft.shape == (20000, 5)
  assert np.all((soft >= 0) & (soft <= 1))
  np.testing.assert_allclose(soft.mean(0), jax.nn.sigmoid(logits), atol=0.02)
  # Differentiable in the logits at a moderate temperature.
  g = jax.grad(lambda l: relaxed_bernoulli(KEY, l, 0.5).sum())(logits)
  assert np.all(np.isfinite(g)) and np.all(g > 0)


def test_hard_bernoulli():
  logits = jnp.array([-1.0, -1e-3, 0.0, 1e-3, 2.0])
  np.testing.assert_array_equal(hard_bernoulli(logits), [0, 0, 0, 1, 1])
  assert hard_bernoulli(logits).dtype == logits.dtype


# --- decoders ----------------------------------------------------------------------------

@pytest.mark.parametrize("image_shape,arch", [((28, 28, 1), "conv"), ((32, 32, 3), "conv"),
                                              ((64, 64, 3), "conv"), ((8, 8, 1), "conv"),
                                              ((28, 28, 1), "mlp"), ((2,), "conv")])
def test_gaussian_decoder(image_shape, arch):
  model = MeanDecoder(image_shape, channels=(16, 8), arch=arch, mlp_hidden=(32, 32))
  z = randn(0, (B, D))
  params = random_params(model, z)
  target = randn(1, (B, *image_shape))

  @jit
  def check(params, z):
    out = model.apply(params, z)
    grads = jax.grad(lambda p: jnp.sum((model.apply(p, z) - target) ** 2))(params)
    # Per-example Jacobians ∂μ(z_i)/∂z_i.
    jac = jax.vmap(jax.jacfwd(lambda zi: model.apply(params, zi[None])[0]))(z)
    return out, grads, jac

  out, grads, jac = check(params, z)
  assert out.shape == (B, *image_shape)
  assert_grads_ok(grads)
  jac = jac.reshape(B, -1, D)
  assert jac.shape == (B, int(np.prod(image_shape)), D)
  assert_depends_on_z(out, jac)
  # The Jacobian is the derivative: check one column against a central difference.
  h = 1e-3
  out_plus, out_minus = check(params, z.at[:, 0].add(h))[0], check(params, z.at[:, 0].add(-h))[0]
  np.testing.assert_allclose(jac[:, :, 0], (out_plus - out_minus).reshape(B, -1) / (2 * h),
                             atol=5e-3)


def test_gaussian_decoder_per_example_independence():
  model = MeanDecoder((28, 28, 1), channels=(16, 8))
  z = randn(0, (B, D))
  params = random_params(model, z)
  apply = jit(model.apply)
  out, out2 = apply(params, z), apply(params, z.at[2].add(1.0))
  np.testing.assert_allclose(out2[:2], out[:2], rtol=1e-5, atol=1e-6)


UNET_CASES = [  # (image_shape, conditioning, channel_mult, num_res_blocks, attn_resolutions)
    ((28, 28, 1), "adagn", (1, 2, 2), 1, (14,)),  # 28 → 14 → 7 and back, self-attention at 14
    ((32, 32, 3), "adagn", (1, 2), 1, (16,)),
    # num_res_blocks=0 (the middle and up-path blocks remain, z enters there) to keep the
    # compile time, which dominates on CPU, in check.
    ((28, 28, 1), "film", (1, 2), 0, ()),
    ((28, 28, 1), "xattn", (1, 2), 0, ()),
    ((32, 32, 3), "film", (1, 2), 0, ()),
    ((32, 32, 3), "xattn", (1, 2), 0, ()),
    ((64, 64, 3), "film", (1, 2), 0, ()),
    ((2,), "adagn", (1,), 1, ()),
]


def tiny_unet(image_shape, conditioning, **kwargs):
  kwargs = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, emb_dim=16,
                conditioning=conditioning, latent_dim=D, num_heads=2) | kwargs
  return UNetDecoder(image_shape, **kwargs)


@pytest.mark.parametrize(
    "image_shape,conditioning,channel_mult,num_res_blocks,attn_resolutions", UNET_CASES)
def test_unet_decoder(image_shape, conditioning, channel_mult, num_res_blocks, attn_resolutions):
  model = tiny_unet(image_shape, conditioning, channel_mult=channel_mult,
                    num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions)
  # Same x_t and t for every example, so outputs can only differ through z.
  x_t = jnp.broadcast_to(randn(0, (1, *image_shape)), (B, *image_shape))
  t, z, target = jnp.full((B,), 0.4), randn(1, (B, D)), randn(2, (B, *image_shape))
  params = random_params(model, x_t, t, z)

  def loss(params, z):
    out = model.apply(params, x_t, t, z)
    return jnp.sum((out - target) ** 2), out

  (_, out), (grads, grad_z) = jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, z)
  assert out.shape == x_t.shape
  assert np.all(np.isfinite(out))
  assert_grads_ok(grads)
  assert_depends_on_z(out, grad_z)


def test_unet_zero_init_and_dropout():
  model = tiny_unet((8, 8, 1), "adagn", channel_mult=(1,), num_res_blocks=0, dropout=0.5)
  x_t, t, z = randn(0, (B, 8, 8, 1)), jnp.full((B,), 0.5), randn(1, (B, D))
  apply = jit(lambda params, key, train: model.apply(params, x_t, t, z, train=train,
                                                     rngs={"dropout": key}), static_argnums=2)
  k1, k2 = jax.random.split(KEY)
  # The zero-initialised output conv gives ε̂ = 0 exactly, dropout or not.
  params = jit(model.init)(KEY, x_t, t, z)
  assert not np.any(params["params"]["out"]["kernel"])
  np.testing.assert_array_equal(apply(params, k1, False), 0.0)
  np.testing.assert_array_equal(apply(params, k1, True), 0.0)
  # Dropout ('dropout' rng) only when train=True.
  params = random_params(model, x_t, t, z)
  assert not np.allclose(apply(params, k1, True), apply(params, k2, True))
  np.testing.assert_array_equal(apply(params, k1, False), apply(params, k2, False))


@pytest.mark.parametrize("resolution", [64, 32])
def test_unet_expresses_diffae_64(resolution):
  model = UNetDecoder((resolution, resolution, 3), channels=64, channel_mult=(1, 2, 4, 8),
                      num_res_blocks=2, attn_resolutions=(16,), emb_dim=512, dropout=0.1,
                      conditioning="adagn", latent_dim=512)
  x_t, t, z = jnp.zeros((2, resolution, resolution, 3)), jnp.zeros((2,)), jnp.zeros((2, 512))
  params = jax.eval_shape(model.init, KEY, x_t, t, z)
  out = jax.eval_shape(lambda p: model.apply(p, x_t, t, z, train=True, rngs={"dropout": KEY}),
                       params)
  assert out.shape == x_t.shape


def test_unet_rejects_bad_conditioning():
  model = tiny_unet((8, 8, 1), "concat")
  with pytest.raises(ValueError, match="conditioning"):
    jax.eval_shape(model.init, KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1, D)))


@pytest.mark.parametrize("shape,kernel,strides", [
    ((3, 4, 4, 5), (3, 3), (1, 1)),     # im2col (16 positions)
    ((2, 7, 7, 3), (4, 4), (2, 2)),     # im2col, strided, even kernel, odd size (16 positions)
    ((2, 2, 2, 8), (1, 1), (1, 1)),     # im2col, 1×1
    ((2, 8, 8, 4), (3, 3), (1, 1)),     # above the threshold: lax itself
])
def test_conv_matches_flax_conv_in_value_and_every_derivative(shape, kernel, strides):
  """layers.Conv is nn.Conv (same params), computed on small CPU maps as im2col @ kernel:
  value, reverse-mode gradients, forward-mode Jacobian in x and JVP in the kernel agree."""
  from diffenc_jax.models.layers import Conv
  x = jax.random.normal(jax.random.key(0), shape)
  ref, ours = nn.Conv(6, kernel, strides=strides), Conv(6, kernel, strides=strides)
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(1), x))

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()))

  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  close(ours.apply(params, x), ref.apply(params, x))
  # the path taken: im2col (no convolution in the program) on maps of ≤ 16 output positions
  im2col = np.prod(ref.apply(params, x).shape[1:3]) <= 16
  assert ("conv_general_dilated" in str(jax.make_jaxpr(ours.apply)(params, x))) != im2col
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))):
    close(a, b)
  corner = lambda m: lambda x: m.apply(params, x)[0, :2, :2, 0]
  close(jax.jacfwd(corner(ours))(x), jax.jacfwd(corner(ref))(x))
  tangent = jax.tree.map(jnp.ones_like, params)
  jvp = lambda m: jax.jvp(lambda p: m.apply(p, x), (params,), (tangent,))[1]
  close(jvp(ours), jvp(ref))


@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
def test_upsample_is_a_nearest_resize_then_conv(size):
  """Upsample: exact 2× by broadcasting (its fast path) or any size by jax.image.resize; both
  equal nearest resizing followed by the block's 3×3 conv, in value and gradient."""
  from diffenc_jax.models.layers import Upsample
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  block = Upsample()
  params = block.init(jax.random.key(1), x, size)
  conv = nn.Conv(5, (3, 3))

  def reference(p, x):
    return conv.apply({"params": p["params"]["Conv_0"]},
                      jax.image.resize(x, (2, *size, 5), method="nearest"))

  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  ours = lambda p, x: block.apply(p, x, size)
  np.testing.assert_allclose(ours(params, x), reference(params, x), atol=1e-5)
  # exact 2× takes the broadcast, without resize's gather
  assert ("gather" in str(jax.make_jaxpr(ours)(params, x))) != (size == (6, 8))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(reference), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, atol=1e-4)
