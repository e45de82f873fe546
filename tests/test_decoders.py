"""Decoders as pieces: the transformer denoiser, DiffAE's z scale, DDIM inversion, the
z-normalised latent prior, and `decoders.build` for every method."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import (chain, data, decoders, latent_prior, methods, models,
                         posterior_check, samplers, schedules, train_state)
from diffenc_jax.models import dit

SCHED = schedules.CosineSchedule()


def test_patchify_round_trips_and_orders_patches_row_major():
  x = jnp.arange(2 * 6 * 4 * 3, dtype=jnp.float32).reshape(2, 6, 4, 3)
  tokens = dit.patchify(x, 2)
  assert tokens.shape == (2, 6, 12)
  np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4].reshape(-1))  # second patch
  np.testing.assert_array_equal(dit.unpatchify(tokens, (6, 4, 3), 2), x)


def test_dit_is_zero_at_init_and_uses_t_and_z_once_trained():
  net = models.DiTDenoiser(image_shape=(28, 28, 1), patch_size=7, width=32, depth=2,
                           num_heads=4, latent_dim=3)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  t, z = jnp.linspace(0.1, 0.9, 4), jax.random.normal(jax.random.key(1), (4, 3))
  params = net.init(jax.random.key(2), x, t, z)
  out = net.apply(params, x, t, z)
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero and a zero output layer
  # move every zero-initialised weight: now the output depends on x, t and z
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  base = net.apply(params, x, t, z)
  for other in (net.apply(params, x, t, z + 1.0), net.apply(params, x, t * 0.5, z),
                net.apply(params, x + 0.1, t, z)):
    assert float(jnp.max(jnp.abs(other - base))) > 1e-3
  # examples are independent: the first example's output does not see the others
  np.testing.assert_allclose(net.apply(params, x[:1], t[:1], z[:1]), base[:1], atol=1e-5)


def test_dit_rejects_an_image_size_not_divisible_by_the_patch():
  net = models.DiTDenoiser(image_shape=(28, 28, 1), patch_size=5, width=8, depth=1, num_heads=1)
  with pytest.raises(ValueError, match="patch_size 5"):
    net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1, 2)))


def test_scale_conditioning_multiplies_the_features_and_adds_nothing_to_time():
  """'scale' (DiffAE's code): each ResBlock gets a scale_mod from z and no z enters the time
  embedding; with z's scale weights zeroed, z cannot change the output."""
  net = models.UNetDecoder(image_shape=(8, 8, 1), channels=8, channel_mult=(1,),
                           emb_dim=16, conditioning="scale", latent_dim=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, z = jnp.array([0.3, 0.6]), jax.random.normal(jax.random.key(1), (2, 3))
  params = net.init(jax.random.key(2), x, t, z)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
  assert not any("z_proj" in n for n in names)
  scale_kernels = [n for n in names if "scale_mod" in n and n.endswith("kernel")]
  res_blocks = {n.split("/")[1] for n in names if n.split("/")[1].startswith("ResBlock")}
  assert len(scale_kernels) == len(res_blocks) == 5  # 1 down, 2 middle, 2 up: one each
  params = jax.tree.map(lambda p: p + 0.1, params)  # the zero output conv moves too
  z_free = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if "scale_mod" in str(path) else p, params)
  a = net.apply(z_free, x, t, z)
  np.testing.assert_allclose(net.apply(z_free, x, t, -3 * z), a, atol=1e-6)
  assert float(jnp.max(jnp.abs(net.apply(params, x, t, -3 * z) - net.apply(params, x, t, z)))) > 1e-3


def test_ddim_inversion_of_an_exact_point_mass_round_trips():
  """With the exact ε of a point mass x_0 = μ, ε̂ is constant along the DDIM path, so
  inversion then DDIM returns μ (and x_T) to float tolerance, for any number of steps."""
  mu = jax.random.uniform(jax.random.key(0), (3, 5, 5, 1), minval=-1, maxval=1)

  def eps_fn(x_t, t):
    alpha, sigma = (a[:, None, None, None] for a in SCHED.alpha_sigma(t))
    return (x_t - alpha * mu) / sigma

  for steps in (3, 20):
    x_T = samplers.ddim_invert(eps_fn, mu, SCHED, steps)
    back = samplers.latent_ddim(eps_fn, jax.random.key(1), mu.shape, SCHED, steps, x_init=x_T)
    np.testing.assert_allclose(back, mu, atol=2e-4)
  # the DDIM ODE of Gaussian data: inversion is accurate to the discretisation, and improves
  mean, std = 0.2, 0.5

  def gauss_eps(x_t, t):
    alpha, sigma = (a[:, None, None, None] for a in SCHED.alpha_sigma(t))
    return sigma * (x_t - alpha * mean) / (alpha**2 * std**2 + sigma**2)

  x0 = mean + std * jax.random.normal(jax.random.key(2), (3, 5, 5, 1))
  errors = []
  for steps in (10, 100):
    x_T = samplers.ddim_invert(gauss_eps, x0, SCHED, steps)
    back = samplers.latent_ddim(gauss_eps, jax.random.key(1), x0.shape, SCHED, steps, x_init=x_T)
    errors.append(float(jnp.max(jnp.abs(back - x0))))
  assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05


def test_latent_prior_standardises_with_running_statistics():
  config = tiny.get_config()
  config.latent_prior.normalize = True
  prior = latent_prior.LatentDDPMPrior(config, SCHED)
  mean, std = jnp.array([2.0, -1.0, 0.0, 5.0]), jnp.array([0.5, 1.5, 3.0, 0.1])
  stats = prior.init_stats()
  for i in range(1500):
    z = mean + std * jax.random.normal(jax.random.key(i), (64, 4))
    stats = prior.update_stats(stats, z)
  m, s = prior.mean_std(stats)
  np.testing.assert_allclose(m, mean, atol=0.1 * float(std.max()))
  np.testing.assert_allclose(s, std, rtol=0.1)
  # a prior with the exact ε of N(0, I) in standardised units samples N(mean, std²)
  prior.eps_fn = lambda params: (lambda z_t, t: SCHED.sigma(t)[:, None] * z_t)
  samples = prior.sample(None, jax.random.key(1), 4000, stats)
  np.testing.assert_allclose(samples.mean(0), m, atol=0.1 * float(std.max()))
  np.testing.assert_allclose(samples.std(0), s, rtol=0.1)
  # its loss sees standardised codes: N(mean, std²) codes give the loss of N(0, I) codes
  params = jax.tree.map(jnp.zeros_like, prior.init(jax.random.key(0)))
  prior = latent_prior.LatentDDPMPrior(config, SCHED)
  z = mean + std * jax.random.normal(jax.random.key(7), (4096, 4))
  std_loss = prior.loss(params, z, jax.random.key(3), {"mean": mean, "sq": std**2 + mean**2})
  raw = prior.loss(params, (z - mean) / std, jax.random.key(3))
  np.testing.assert_allclose(std_loss, raw, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method,decoder,denoiser", [
    ("diffenc", "gaussian", "unet"), ("diffenc", "diffusion", "dit"),
    ("vae", "gaussian", "unet"), ("diffae", "diffusion", "dit"), ("diffae", "diffusion", "unet"),
    ("dmz", "diffusion", "dit")])
def test_every_method_composes_a_decoder_of_the_config(method, decoder, denoiser):
  config = tiny.get_config()
  config.method, config.model.decoder, config.model.denoiser = method, decoder, denoiser
  config.model.dit_patch_size, config.model.dit_width = 7, 16
  config.model.unet_conditioning = "xattn" if method == "dmz" else "scale"
  m = methods.get_method(config, (28, 28, 1))
  assert isinstance(m.decoder, {"gaussian": decoders.GaussianDecoder,
                                "diffusion": decoders.DiffusionDecoder}[decoder])
  if decoder == "diffusion":
    assert isinstance(m.decoder.network, {"dit": models.DiTDenoiser,
                                          "unet": models.UNetDecoder}[denoiser])
  params = jax.jit(m.init_state)(jax.random.key(0)).params["decoder"]
  x = jnp.zeros((2, 28, 28, 1))
  z = jnp.ones((2, 4))
  assert m.decoder.nll(params, x, z, jax.random.key(1)).shape == (2,)
  assert m.decoder.loss(params, x, z, jax.random.key(1)).shape == (2,)
  assert m.decode(params, z, jax.random.key(1)).shape == (2, 28, 28, 1)


def test_joint_warmup_rounds_then_em_rounds():
  """em.joint_warmup_rounds: rounds before it are `joint_round` (the decoder's loss reaches the
  encoder through the sampler), later ones `em_round`, each as called alone (the trainer's
  form: one program per phase, `phase_at`)."""
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser = "diffusion", "dit"
  config.model.dit_width, config.em.joint_warmup_rounds = 16, 1
  config.em.langevin.step_rule, config.em.langevin.mala = "fixed", False
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  xs = jax.random.uniform(jax.random.key(1), (1, 8, 28, 28, 1), minval=-1, maxval=1)
  key = jax.random.key(2)
  round_fn = jax.jit(m.train_round)
  phased = jax.jit(m.train_round, static_argnames="phase")
  assert [m.phase_at(s) for s in (0, 1)] == ["joint_warmup", "em"]
  warm, _ = round_fn(state, xs, key)
  joint, joint_metrics = phased(state, xs, key, phase="joint_warmup")
  # equal up to XLA's fusion of one program vs another (a wrong branch differs by ≫ 1e-6)
  chex_equal = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
  chex_equal(warm.params, joint.params)
  after, metrics = round_fn(warm, xs, key)
  em_state, em_metrics = phased(warm, xs, key, phase="em")
  chex_equal(after.params, em_state.params)
  assert int(after.step) == int(em_state.step) == 2
  assert set(metrics) == set(em_metrics) == set(joint_metrics)
  # the phase's program is that form alone
  joint_alone, _ = jax.jit(m.joint_round)(state, xs, key)
  chex_equal(joint.params, joint_alone.params)
  # the warm-up's encoder update carries the decoder's gradient: without it, it differs
  x = xs[0]
  k_enc, k_dec, k_den = jax.random.split(jax.random.fold_in(key, 0), 3)
  enc_only = jax.grad(lambda p: m.encoder_loss(
      p, x, jax.lax.stop_gradient(m.encode(p, x, k_enc, deterministic=True)), k_den))(
          state.params["encoder"])
  alone = m.apply_update(state, "encoder", m.enc_opt, enc_only)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), alone.params["encoder"],
                      joint.params["encoder"])
  assert max(jax.tree.leaves(diff)) > 0


def _gaussian_warmup_config():
  """The tiny config with a small transformer diffusion decoder, one gaussian warm-up round and
  the cheap `snr` chain for EM."""
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser = "diffusion", "dit"
  config.model.dit_width, config.em.gaussian_warmup_rounds = 16, 1
  config.em.langevin.step_rule, config.em.langevin.mala = "snr", False
  return config


def test_gaussian_warmup_rounds_then_diffusion_em():
  """em.gaussian_warmup_rounds: the first rounds run the E-step on the auxiliary gaussian
  decoder (z^K equals `posterior_sample` on it with em.warm_langevin's chain) and update both
  decoders on its latents; later rounds are plain `em_round`s on the diffusion decoder and leave
  the gaussian one alone. The trainer compiles each phase as a program of its own (`phase_at`):
  the same numbers, without the other phase's branch."""
  config = _gaussian_warmup_config()
  config.em.warm_langevin.num_steps = 2
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  assert "warm_decoder" in state.params and m.warm_decoder.kind == "gaussian"
  xs = jax.random.uniform(jax.random.key(1), (1, 8, 28, 28, 1), minval=-1, maxval=1)
  key = jax.random.key(2)
  round_fn = jax.jit(m.train_round)
  phased = jax.jit(m.train_round, static_argnames="phase")
  assert [m.phase_at(s) for s in (0, 1, 5)] == ["gaussian_warmup", "em", "em"]
  warm, metrics = round_fn(state, xs, key)
  alone, _ = phased(state, xs, key, phase="gaussian_warmup")
  close = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
  close(warm.params, alone.params)
  moved = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))
  # both decoders learnt in the warm-up round
  assert moved(warm.params["warm_decoder"], state.params["warm_decoder"]) > 0
  assert moved(warm.params["decoder"], state.params["decoder"]) > 0
  assert float(metrics["warm_dec_loss"]) > 0
  # the warm-up's z^K is the gaussian decoder's chain (em.warm_langevin: gauss_newton + MALA)
  x = xs[0]
  lat = m.latents(state.params, x, key, stage="gaussian_warmup")
  ref = chain.posterior_sample(config, m.warm_decoder, state.params["warm_decoder"], x, lat["z0"],
                            jax.random.split(key)[1], 2, langevin=config.em.warm_langevin)[0]
  np.testing.assert_allclose(lat["zK"], ref, rtol=1e-5, atol=1e-6)
  # after the warm-up: em_round on the diffusion decoder; the gaussian decoder stays put
  after, metrics = round_fn(warm, xs, key)
  plain, plain_metrics = phased(warm, xs, key, phase="em")
  close(after.params, plain.params)
  assert moved(after.params["warm_decoder"], warm.params["warm_decoder"]) == 0
  assert float(metrics["warm_dec_loss"]) == 0 and set(metrics) == set(plain_metrics)
  assert int(plain.step) == 2
  # each phase's program lacks the other's branch
  count = lambda phase: str(jax.make_jaxpr(
      lambda s: m.train_round(s, xs, key, phase=phase))(warm)).count(" cond[")
  assert count(None) > count("em") and count(None) > count("gaussian_warmup")
  with pytest.raises(ValueError, match="phase must be one of"):
    m.train_round(warm, xs, key, phase="warm")


def test_gaussian_warmup_has_its_own_beta_and_shifts():
  """em.warm_beta and em.warm_shift act on the gaussian warm-up alone: its round is the plain
  warm-up round at β = warm_beta on data.random_shift'ed images (the round's key split once,
  as the trainer's augmentation does); the EM round's stage is unchanged. With persistent
  chains a shifted warm-up leaves their slots empty (EM's first visit then starts at z⁰, not at
  a shifted copy's code); an unshifted one fills them."""
  config = _gaussian_warmup_config()
  config.bottleneck.beta, config.em.chain_slots = 0.25, 64
  base = methods.get_method(config, (28, 28, 1))
  own = copy.deepcopy(config)
  own.em.warm_beta, own.em.warm_shift = 1.0, 2
  m = methods.get_method(own, (28, 28, 1))
  at_one = copy.deepcopy(config)
  at_one.bottleneck.beta = 1.0
  ref = methods.get_method(at_one, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  xs = jax.random.uniform(jax.random.key(1), (1, 8, 28, 28, 1), minval=-1, maxval=1)
  key, index = jax.random.key(2), jnp.arange(8)[None] * 3
  phased = lambda method: jax.jit(method.train_round, static_argnames="phase")
  warm, warm_metrics = phased(m)(state, xs, key, index, phase="gaussian_warmup")
  k_shift, k_round = jax.random.split(key)
  moved_xs = data.random_shift(k_shift, xs, 2)
  expected, metrics = phased(ref)(state, moved_xs, k_round, index, phase="gaussian_warmup")
  for a, b in zip(jax.tree.leaves(warm.params), jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # both levers matter (so that the equality above could fail): the warm-up chain's z^K moves
  # with β, and the shifted images differ from the unshifted ones
  warm_zk = lambda beta: m.latents(state.params, xs[0], key, beta=beta,
                                   stage="gaussian_warmup")["zK"]
  assert float(jnp.max(jnp.abs(warm_zk(1.0) - warm_zk(0.25)))) > 1e-3
  assert float(jnp.max(jnp.abs(moved_xs - xs))) > 0.5
  # the EM round's stage is the one without the levers
  assert m.stage_of("em") == base.stage_of("em")
  assert m.stage_of("gaussian_warmup").beta == 1.0 and base.stage_of("gaussian_warmup").beta == 0
  # the slots: left empty by the shifted warm-up, filled by the unshifted one
  for out, met, filled in ((warm, warm_metrics, 0), (expected, metrics, 1)):
    chains = out.opt_state["chains"]
    assert int(chains["visits"].sum()) == 8 * filled
    assert (float(jnp.abs(chains["z"]).sum()) > 0) == bool(filled)
    assert float(met["chain_visits"]) == filled
  bad = copy.deepcopy(own)
  bad.em.gaussian_warmup_rounds = 0
  with pytest.raises(ValueError, match="need em.gaussian_warmup_rounds > 0"):
    methods.validate(bad)


def test_shifted_warmup_fills_chains_from_its_unshifted_visits():
  """em.warm_fill_unshifted: the shifted warm-up trains as without it (bitwise) and keeps z^K
  in the slots of exactly the examples it saw unshifted (offset (s, s)), the others' slots
  left as they were."""
  config = _gaussian_warmup_config()
  config.em.chain_slots, config.em.warm_shift = 64, 1
  empty = methods.get_method(config, (28, 28, 1))
  config.em.warm_fill_unshifted = True
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  xs = jax.random.uniform(jax.random.key(1), (1, 32, 28, 28, 1), minval=-1, maxval=1)
  key, index = jax.random.key(2), jnp.arange(32)[None] * 2
  phased = lambda method: jax.jit(method.train_round, static_argnames="phase")
  out, _ = phased(m)(state, xs, key, index, phase="gaussian_warmup")
  ref, _ = phased(empty)(state, xs, key, index, phase="gaussian_warmup")
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(a, b)
  _, offset = data.random_shift(jax.random.split(key)[0], xs, 1, return_offsets=True)
  unshifted = np.asarray(offset[0] == data.unshifted_offset(1))
  assert 0 < unshifted.sum() < 32  # both kinds of visit occur, so the check below can fail
  visits = np.asarray(out.opt_state["chains"]["visits"])
  expected = np.zeros(64, int)
  expected[np.asarray(index[0])[unshifted]] = 1
  np.testing.assert_array_equal(visits, expected)
  z = np.asarray(out.opt_state["chains"]["z"])
  assert np.all(np.abs(z[expected == 1]).sum(-1) > 0) and not np.any(z[expected == 0])
  bad = copy.deepcopy(config)
  bad.em.warm_shift = 0
  with pytest.raises(ValueError, match="em.warm_fill_unshifted .* needs em.warm_shift > 0"):
    methods.validate(bad)


def test_warm_shift_decay_moves_fewer_images_as_the_warmup_ends():
  """em.warm_shift_decay: the warm-up's round at step t moves each image with probability
  1 − t / rounds (a draw from the shift's key folded with 1). At round 0 it is the shifted
  warm-up's round, bitwise; at the warm-up's end the unshifted one's (every chain filled); in
  between, the chains keep the z^K of exactly the unmoved images, more than the shifts' own."""
  config = _gaussian_warmup_config()
  config.em.chain_slots, config.em.gaussian_warmup_rounds = 64, 4
  plain = methods.get_method(copy.deepcopy(config), (28, 28, 1))
  config.em.warm_shift, config.em.warm_fill_unshifted = 1, True
  shifted = methods.get_method(copy.deepcopy(config), (28, 28, 1))
  config.em.warm_shift_decay = True
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  xs = jax.random.uniform(jax.random.key(1), (1, 32, 28, 28, 1), minval=-1, maxval=1)
  key, index = jax.random.key(2), jnp.arange(32)[None] * 2
  at = lambda t: state.replace(step=jnp.asarray(t, state.step.dtype))
  run = lambda method, s, k: jax.jit(method.train_round, static_argnames="phase")(
      s, xs, k, index, phase="gaussian_warmup")
  out, _ = run(m, at(0), key)
  ref, _ = run(shifted, at(0), key)
  for a, b in zip(jax.tree.leaves((out.params, out.opt_state)),
                  jax.tree.leaves((ref.params, ref.opt_state))):
    np.testing.assert_array_equal(a, b)
  k_shift, k_round = jax.random.split(key)
  out, metrics = run(m, at(4), key)
  ref, ref_metrics = run(plain, at(4), k_round)
  for name in ("gap", "move", "dec_loss_zK", "warm_dec_loss"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(out.opt_state["chains"]["visits"],
                                ref.opt_state["chains"]["visits"])
  np.testing.assert_allclose(out.opt_state["chains"]["z"], ref.opt_state["chains"]["z"],
                             rtol=1e-5, atol=1e-6)
  out, _ = run(m, at(2), key)
  _, offset = data.random_shift(k_shift, xs, 1, return_offsets=True)
  keep = jax.random.bernoulli(jax.random.fold_in(k_shift, 1), 0.5, offset.shape)
  centre = offset == data.unshifted_offset(1)
  unmoved = np.asarray(centre | keep)[0]
  assert np.asarray(centre[0]).sum() < unmoved.sum() < 32  # the check below can fail
  expected = np.zeros(64, int)
  expected[np.asarray(index[0])[unmoved]] = 1
  np.testing.assert_array_equal(out.opt_state["chains"]["visits"], expected)
  bad = copy.deepcopy(config)
  bad.em.warm_shift, bad.em.warm_fill_unshifted = 0, False
  with pytest.raises(ValueError, match="em.warm_shift_decay .* needs em.warm_shift > 0"):
    methods.validate(bad)


def test_em_shift_continues_only_the_unmoved_examples_chains():
  """em.em_shift: an EM round moves a fraction of its images (data.random_shift, the round's key
  split in three); a moved example is a chain's first visit that is not kept (its chain starts
  at z⁰ with an unknown curvature, its slot left as it was), an unmoved one continues its slot:
  the round equals the plain EM round on the same images with the moved examples' slots
  unvisited, apart from the moved examples' slots."""
  config = _gaussian_warmup_config()
  config.em.chain_slots, config.em.gaussian_warmup_rounds = 64, 0
  config.em.langevin.step_rule = "diagonal"
  plain = methods.get_method(copy.deepcopy(config), (28, 28, 1))
  config.em.em_shift, config.em.em_shift_fraction = 1, 0.5
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  index = jnp.arange(32)[None] * 2
  filled = {"z": jax.random.normal(jax.random.key(3), (64, config.model.latent_dim)),
            "visits": jnp.full((64,), 3, jnp.int32),
            "curvature": jnp.full((64, config.model.latent_dim), 2.0)}
  state = state.replace(opt_state={**state.opt_state, "chains": filled})
  xs = jax.random.uniform(jax.random.key(1), (1, 32, 28, 28, 1), minval=-1, maxval=1)
  key = jax.random.key(2)
  out, metrics = jax.jit(m.train_round)(state, xs, key, index)
  k_shift, k_pick, k_round = jax.random.split(key, 3)
  moved_xs, offset = data.random_shift(k_shift, xs, 1, return_offsets=True)
  moved = ((offset != data.unshifted_offset(1))
           & jax.random.bernoulli(k_pick, 0.5, offset.shape))
  n_moved = int(moved.sum())
  assert 0 < n_moved < 32  # both kinds occur, so the checks below can fail
  xs_e = jnp.where(moved[..., None, None, None], moved_xs, xs)
  slots = np.asarray(index[0])
  unvisited = {**filled, "visits": filled["visits"].at[slots].set(
                   jnp.where(moved[0], 0, filled["visits"][slots])),
               "curvature": filled["curvature"].at[slots].set(
                   jnp.where(moved[0][:, None], 0.0, filled["curvature"][slots]))}
  ref, ref_metrics = jax.jit(plain.train_round)(
      state.replace(opt_state={**state.opt_state, "chains": unvisited}), xs_e, k_round, index)
  # the round's losses and the chains' move (of the latents all examples' updates are made of;
  # Adam's first step, ± lr per parameter, would turn float noise into sign flips)
  for name in ("enc_loss", "gap", "move", "dec_loss_zK", "dec_loss_z0"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  got, want = out.opt_state["chains"], ref.opt_state["chains"]
  mv, kept = slots[np.asarray(moved[0])], slots[~np.asarray(moved[0])]
  for name in ("z", "curvature"):  # unmoved: continued as the plain round; moved: untouched
    np.testing.assert_allclose(got[name][kept], want[name][kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[name][mv], filled[name][mv])
    assert float(jnp.abs(want[name][mv] - filled[name][mv]).max()) > 1e-4
  np.testing.assert_array_equal(got["visits"][kept], 4)
  np.testing.assert_array_equal(got["visits"][mv], 3)
  # the moved examples did not start at their slots: the round differs from one that did
  _, cont = jax.jit(plain.train_round)(state, xs_e, k_round, index)
  assert abs(float(cont["gap"]) - float(metrics["gap"])) > 1e-3 * float(metrics["gap"])


def test_encoder_rate_scaled_once_em_starts():
  """em.em_enc_lr_scale: Adam's first updates have size ≈ lr; from the round the gaussian
  warm-up ends (× updates per round) on they are scale × that, and not before."""
  opt = train_state.make_optimizer(1.0, warmup_steps=1, grad_clip=1e9, scale_after=(3, 0.1))
  params = jnp.zeros((4,))
  opt_state = opt.init(params)
  sizes = []
  for _ in range(5):
    updates, opt_state = opt.update(jnp.ones((4,)), opt_state, params)
    sizes.append(float(jnp.max(jnp.abs(updates))))
  np.testing.assert_allclose(sizes, [1, 1, 1, 0.1, 0.1], rtol=1e-3)
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser, config.model.dit_width = "diffusion", "dit", 16
  config.em.gaussian_warmup_rounds, config.em.em_enc_lr_scale = 2, 0.1
  config.train.batches_per_round = 2
  m = methods.get_method(config, (28, 28, 1))
  enc = jnp.zeros((3,))
  state = m.enc_opt.init(enc)
  sizes = []
  for _ in range(6):
    updates, state = m.enc_opt.update(jnp.ones((3,)), state, enc)
    sizes.append(float(jnp.max(jnp.abs(updates))))
  # 2 warm-up rounds × 2 encoder updates per round at the full rate, then 0.1 × it
  assert sizes[3] > 0.5 * sizes[2] and sizes[4] < 0.2 * sizes[3]


@pytest.mark.parametrize("step_rule,mala", [("gauss_newton", True), ("snr", False)])
def test_diffusion_decoder_e_step_runs_on_the_estimator(step_rule, mala):
  """diffenc's E-step with a diffusion decoder: the energy of `posterior.diffusion_nll_fn`
  (antithetic, importance-weighted, control variate) and, for gauss_newton, its
  Gauss-Newton precision; the chain moves and its diagnostics are finite."""
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser, config.model.dit_width = "diffusion", "dit", 16
  lv = config.em.langevin
  lv.step_rule, lv.mala, lv.control_variate, lv.gn_levels = step_rule, mala, True, 2
  m = methods.get_method(config, (28, 28, 1))
  state = jax.jit(m.init_state)(jax.random.key(0))
  # a decoder that uses z: move every weight off its (zero) initialisation
  state = state.replace(params={**state.params, "decoder": jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.key(5), p.shape),
      state.params["decoder"])})
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1)
  lat = jax.jit(lambda p, x, k: m.latents(p, x, k, 3))(state.params, x, jax.random.key(2))
  info = lat["info"]
  assert float(info.move_norm) > 0 and np.isfinite(float(info.move_norm))
  assert 0.0 <= float(info.accept_rate) <= 1.0
  assert float(jnp.max(jnp.abs(lat["zK"] - lat["z0"]))) > 0


def _perturbed_model(config):
  """(method, params, x (6, 8, 8, 1), key) for config: params moved away from the
  zero-initialised outputs, so that z⁰ and the decoder's NLL depend on things."""
  m = methods.get_method(config, (8, 8, 1))
  params = jax.jit(m.init_state)(jax.random.key(0)).params
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(jax.random.key(i), p.shape)
                                     for i, p in enumerate(leaves)])
  x = np.asarray(jax.random.uniform(jax.random.key(2), (6, 8, 8, 1), minval=-1.0))
  return m, params, x, jax.random.key(3)


@pytest.mark.parametrize("decoder", ["gaussian", "diffusion"])
def test_chain_check_scores_z0_and_zK_under_one_estimate(decoder):
  """posterior_check.chain_check: with no chain steps z^K = z⁰, so every change is exactly 0 — for
  the diffusion decoder only if z⁰ and z^K see the same ELBO draws; the score norm is that of
  U = NLL/β + ½‖z‖² computed here independently; methods without an E-step are refused."""
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser = decoder, "dit"
  config.model.dit_patch_size, config.model.dit_width, config.model.dit_depth = 4, 16, 1
  config.bottleneck.beta = 4.0
  config.em.langevin.step_rule, config.em.langevin.mala = "snr", False
  m, params, x, key = _perturbed_model(config)
  still = posterior_check.chain_check(config, m, params, x, key, draws=4, num_steps=0)
  for k in ("nll_change", "share_better", "energy_change", "gap", "step_size"):
    assert still[k] == 0.0, (k, still[k])
  moved = posterior_check.chain_check(config, m, params, x, key, draws=4)
  assert moved["gap"] > 0 and moved["step_size"] > 0
  np.testing.assert_allclose(moved["nll_z0"], still["nll_z0"], rtol=1e-5)  # the same z⁰
  np.testing.assert_allclose(moved["nll_zK"] - moved["nll_z0"], moved["nll_change"],
                             rtol=1e-4, atol=1e-3)
  # the score at z⁰, independently: z⁰ as chain_check draws it, U with the same draws
  z0 = m.latents(params, x, jax.random.fold_in(key, 0), 0)["z0"]  # batch 0's key
  if decoder == "diffusion":
    nll = lambda z: m.decoder.nll(params["decoder"], x, z, jax.random.key(1), num_samples=4)
  else:
    nll = lambda z: m.decoder.nll(params["decoder"], x, z)
  grad = jax.grad(lambda z: jnp.sum(nll(z) / 4.0 + 0.5 * jnp.sum(z**2, -1)))(z0)
  assert float(jnp.mean(jnp.sum(grad**2, -1))) > 1.0
  np.testing.assert_allclose(still["score_norm"], float(jnp.mean(jnp.linalg.norm(grad, axis=-1))),
                             rtol=1e-4)
  config.method = "diffae"
  with pytest.raises(ValueError, match="no E-step chain"):
    posterior_check.chain_check(config, methods.get_method(config, (8, 8, 1)), params, x, key)


def test_chain_check_coverage_against_a_precomputed_reference():
  """coverage = (NLL(z^K) − NLL(z⁰)) / (NLL_ref − NLL(z⁰)); a reference passed in from an earlier
  call on the same images and key gives every figure that call gave, without its chains."""
  config = tiny.get_config()
  config.bottleneck.beta = 4.0
  config.em.langevin.step_rule, config.em.langevin.mala = "snr", False
  m, params, x, key = _perturbed_model(config)
  run = posterior_check.chain_check(config, m, params, x, key, draws=4, reference_steps=20,
                                    reference_step_size=0.2)
  assert run["nll_ref"] < run["nll_z0"]  # the long chain goes somewhere
  np.testing.assert_allclose(run["coverage"],
                             run["nll_change"] / (run["nll_ref"] - run["nll_z0"]), rtol=1e-6)
  given = posterior_check.chain_check(config, m, params, x, key, draws=4,
                                      reference=(run["nll_ref"], run["nll_ref_prior"]))
  assert given == run
  with pytest.raises(ValueError, match="not both"):
    posterior_check.chain_check(config, m, params, x, key, reference_steps=2, reference=(0, 0))


def test_persistent_visits_continue_each_chain_as_training_does():
  """posterior_check.persistent_visits: visit 1 is the E-step from z⁰ with no curvature known;
  every later visit continues the last state with the running curvature (chain.running_curvature)
  — checked by replaying the visits through method.latents; the states returned are those after
  the visits asked for."""
  config = tiny.get_config()
  config.model.decoder, config.model.denoiser = "diffusion", "dit"
  config.model.dit_patch_size, config.model.dit_width, config.model.dit_depth = 4, 16, 1
  lv = config.em.langevin
  lv.step_rule, lv.mala, lv.fresh_draws, lv.num_steps, lv.step_size = "diagonal", False, True, 2, 0.5
  config.em.curvature_decay = 0.5
  m, params, x, key = _perturbed_model(config)
  states = posterior_check.persistent_visits(config, m, params, x, key, [3, 1], batch_size=6)
  assert sorted(states) == [1, 3] and states[3].shape == (6, config.model.latent_dim)
  k = jax.random.fold_in(key, 0)  # the first batch's key
  z, curv, seen = jnp.zeros((6, config.model.latent_dim)), jnp.zeros((6, config.model.latent_dim)), jnp.zeros((6,), bool)
  replay = {}
  for v in (1, 2, 3):
    lat = m.latents(params, x, jax.random.fold_in(k, v), resume=(z, seen, curv))
    if v == 1:  # from z⁰
      np.testing.assert_allclose(lat["info"].displacement_sq,
                                 np.mean(np.sum((lat["zK"] - lat["z0"]) ** 2, -1)), rtol=1e-4)
    z, seen = lat["zK"], jnp.ones_like(seen)
    new = lat["info"].grad_sq
    curv = jnp.where(curv > 0, 0.5 * curv + 0.5 * new, new)
    replay[v] = np.asarray(z)
  np.testing.assert_allclose(states[1], replay[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(states[3], replay[3], rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(states[3] - states[1])) > 1e-3  # the chain moved on
  with pytest.raises(ValueError, match="visits"):
    posterior_check.persistent_visits(config, m, params, x, key, [0])


@pytest.mark.parametrize("flags,message", [(["--visits=0"], "--visits must be >= 1"),
                                           (["--visits=2", "--persistent"], "cannot go with"),
                                           (["--visits=a"], "must be integers")])
def test_chain_check_refuses_bad_visits_in_one_line(tmp_path, flags, message):
  """chain_check's --visits: bad values get one line, before any run is loaded."""
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "diffenc_jax.experiments.chain_check",
                         f"--workdir={tmp_path / 'none'}", *flags], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_chain_check_langevin_overrides_parse_as_the_fields_types():
  """chain_check --langevin: each value is parsed as its field's type; unknown fields and values
  of the wrong type are refused with a line naming them."""
  from diffenc_jax.experiments import chain_check
  config = tiny.get_config()
  chain_check.set_langevin(config, {"step_size": "0.5", "num_steps": "7", "mala": "false",
                                    "proposal": "uniform", "log_snr_center": "8"})
  lv = config.em.langevin
  assert (lv.step_size, lv.num_steps, lv.mala, lv.proposal, lv.log_snr_center) == (
      0.5, 7, False, "uniform", 8.0)
  assert isinstance(lv.num_steps, int) and isinstance(lv.log_snr_center, float)
  with pytest.raises(ValueError, match="no field 'stepsize'"):
    chain_check.set_langevin(config, {"stepsize": "0.5"})
  with pytest.raises(ValueError, match="num_steps must be of type int"):
    chain_check.set_langevin(config, {"num_steps": "2.5"})
  with pytest.raises(ValueError, match="mala must be of type bool"):
    chain_check.set_langevin(config, {"mala": "yes"})
