"""Default configuration: the diffusion encoder with a gaussian decoder on mnist5k.

Every other config in this folder imports `get_config()` from here and changes a few fields.
Any field can be overridden on the command line, e.g. `--config.em.langevin.num_steps=20`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # diffenc | diffenc_joint | vae | diffae | dmz
  config.method = "diffenc"

  # --- data -------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # mnist5k | digits | toy2d | idx | tfds
  data.name = "mnist5k"
  data.tfds_name = ""  # for name='tfds': mnist, fashion_mnist, cifar10, celeb_a
  data.data_dir = ""  # for name='idx' (required) and name='tfds' (optional TFDS data_dir)
  data.image_size = 0  # 0 keeps the dataset's own size; else resize to this (28, 32 or 64)
  data.num_test = 0  # 0 uses the whole held-out split; else its first num_test examples
  # training images moved by a random (dy, dx) ∈ {-s..s}² pixels, against memorising a small
  # train split (docs/recipes.md, "The recipe and why")
  data.augment_shift = 1

  # --- model ------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.latent_dim = 16
  model.decoder = "gaussian"  # gaussian | diffusion
  model.sigma_x = 0.1  # gaussian decoder's pixel std, images in [-1, 1]
  # encoder (latent denoiser): conv trunk once per image, then a residual MLP over (z_t, t, h)
  model.enc_channels = (32, 64)
  model.enc_features = 256
  model.enc_hidden = 256
  model.enc_blocks = 3
  model.enc_parameterization = "x0"  # eps | x0 | v: what the latent denoiser outputs
  model.enc_weighting = "x0"  # unit | vlb | x0 | v: w(t) of the encoder's denoising loss
  model.enc_noise_draws = 4  # (t, ε) draws per (x, z) pair in each denoising update of it
  # gaussian decoder
  model.dec_arch = "mlp"  # mlp | conv
  model.dec_hidden = (1024, 1024)  # mlp
  model.dec_dropout = 0.0  # mlp: dropout of the hidden units in the decoder's training loss
  model.dec_channels = (64, 32)  # conv
  # diffusion decoder: a z-conditioned denoiser of config.image_schedule's diffusion
  model.denoiser = "unet"  # unet | dit (transformer: matmul-bound, fast on a CPU)
  # what the denoiser outputs, converted to ε̂: eps | v | x0
  model.dec_parameterization = "v"
  # training weighting w(t) of ‖ε − ε̂‖²: unit (DDPM's ε-MSE) | v (1 + 1/SNR: the v-MSE) | x0 |
  # vlb | p2 (1/(1+SNR)^γ) | min_snr (min(SNR, γ)/SNR). The unit ε-MSE spends the gradient at
  # low noise, where x_t already fixes x and z is useless: decoders trained with it ignored z
  # for thousands of rounds. The NLL (E-step, VAE) is always the ELBO, whatever this says.
  model.dec_weighting = "v"
  model.dec_weighting_gamma = 1.0  # γ of p2 and min_snr
  # its NLL (the continuous-time ELBO bound): (t, ε) draws where the caller does not say (the
  # VAE's loss, diffenc_joint's energy); the E-step's chain has its own (em.langevin)
  model.dec_nll_samples = 2
  # transformer denoiser (DiT-style, adaLN-Zero by time and z): p×p patches are the tokens
  model.dit_patch_size = 7
  model.dit_width = 128
  model.dit_depth = 4
  model.dit_heads = 4
  model.dit_dtype = "float32"  # its matmuls' dtype: float32 or bfloat16 (parameters stay float32)
  # U-Net denoiser
  model.unet_channels = 32
  model.unet_channel_mult = (1, 2)
  model.unet_num_res_blocks = 1
  model.unet_attn_resolutions = ()
  model.unet_emb_dim = 128
  model.unet_dropout = 0.0
  # scale: (1 + Dense(z)) scales each ResBlock's time-modulated features (DiffAE's code) |
  # adagn: Dense(z) added to the time embedding | film: a second FiLM by z | xattn: one token
  model.unet_conditioning = "adagn"

  # --- diffusion schedules ----------------------------------------------------------------
  # name: cosine | linear_logsnr; log-SNR λ runs from logsnr_max (t = 0) to logsnr_min (t = 1)
  # latent (encoder) schedule: logsnr_max = 8 (σ_0 ≈ 0.018) resolves the code finely enough for
  # reconstruction and keeps the diffusion-KL rate finite for a near-deterministic encoder
  # (docs/method.md §1.8)
  config.schedule = ml_collections.ConfigDict(
      dict(name="cosine", logsnr_min=-15.0, logsnr_max=8.0))
  config.image_schedule = ml_collections.ConfigDict(  # diffusion decoder
      dict(name="cosine", logsnr_min=-15.0, logsnr_max=15.0))

  # --- encoder sampler: z⁰ ~ q_φ(·|x) by latent DDIM ---------------------------------------
  config.encoder_sampler = sampler = ml_collections.ConfigDict()
  sampler.num_steps = 5  # the trained encoder is nearly deterministic: 5 steps read as 20
  sampler.eta = 1.0  # 0 = deterministic DDIM, 1 = ancestral (DDPM-like)
  sampler.clip = 5.0  # predicted z_0 clipped to ±clip

  # --- the information bottleneck: the rate's weight β in every method's objective ---------
  config.bottleneck = bottleneck = ml_collections.ConfigDict()
  # diffenc's (and diffenc_joint's) posterior temperature, p(z) p(x|z)^(1/β); the VAE's KL weight
  bottleneck.beta = 1.0
  # constant | anneal: β log-linear from beta_start at round 0 to beta at round
  # beta_anneal_steps (schedules.beta_at)
  bottleneck.beta_schedule = "constant"
  bottleneck.beta_start = 1.0
  bottleneck.beta_anneal_steps = 0

  # --- EM ---------------------------------------------------------------------------------
  config.em = em = ml_collections.ConfigDict()
  em.align_weight = 1.0  # λ_align: decoder loss on the encoder's own z⁰
  em.m_updates = 2  # M updates per round (the E-step's latents reused: cheap)
  em.encoder_inner_steps = 1  # encoder denoising updates per E-step on the same (x, z^K)
  # the encoder's denoising update sees its image moved by up to this many pixels (uniform on
  # {-s..s}², edges replicated) with the z^K of the unmoved image as its target: augmentation of
  # the encoder alone, which keeps one persistent chain per example (em.chain_slots)
  em.encoder_shift = 0
  # shift augmentation of the EM rounds (after any warm-up): each image is moved by up to this
  # many pixels (uniform on {-s..s}², edges replicated) with probability em_shift_fraction; a
  # moved image's chain starts at its z⁰ and leaves its persistent chain's slot as it was, an
  # unmoved one continues its slot (one slot per example, em.chain_slots)
  em.em_shift = 0
  em.em_shift_fraction = 1.0
  em.prox_weight = 0.0  # λ_prox: ½ λ_prox ‖z − z⁰‖² added to U
  # rounds of a DiffAE-style joint warm-up before EM (`phases.joint_round`): the
  # decoder's loss on z⁰ reaches the encoder through its sampler, so that z is informative
  # when EM starts (a diffusion decoder that ignores z is a fixed point of EM)
  em.joint_warmup_rounds = 0
  em.joint_code_steps = 0  # the warm-up code's DDIM steps (0 = encoder_sampler.num_steps)
  em.joint_denoise_weight = 1.0  # weight of the encoder's denoising loss in the warm-up
  # rounds of EM against an auxiliary gaussian decoder (model.sigma_x, model.dec_arch) before
  # EM against the diffusion decoder, which learns on the same latents meanwhile: the encoder's
  # codes are informative before the diffusion decoder's posterior drives the E-step
  em.gaussian_warmup_rounds = 0
  # the encoder's learning rate × this once EM against the diffusion decoder starts (after the
  # gaussian warm-up): a chain that barely moves z leaves the encoder learning its own samples,
  # and at the warm-up's rate its codes drift faster than the decoder follows
  em.em_enc_lr_scale = 1.0
  em.langevin = langevin = ml_collections.ConfigDict()
  langevin.num_steps = 5
  # fixed | snr | gauss_newton | diagonal (per-example curvature: persistent chains' running
  # mean of (∇log π)², else the batch's at the start)
  langevin.step_rule = "gauss_newton"
  langevin.step_size = 0.5
  langevin.max_move = 0.0  # fixed rule: per-example cap on the move's norm (0 = none)
  langevin.snr = 0.16  # snr rule's r
  # Metropolis-Hastings correction: rejects the Gauss-Newton proposal that overshoots, which can
  # blow a chain up; one extra ∇U per step (docs/recipes.md, "The recipe and why")
  langevin.mala = True
  langevin.refresh_precision = False  # gauss_newton: recompute H every step (else once at z⁰)
  # diffusion decoder's energy (diffenc_jax/posterior.py): mc_samples (λ, ε) draws per U,
  # fixed along a chain, stratified; antithetic ε/−ε pairs (mc_samples even); λ from proposal
  # uniform_t | uniform | logistic (importance-weighted, centred where z matters); an SVRG
  # control variate at z⁰ with reference_samples draws; gn_levels noise levels of the
  # gauss_newton rule's precision
  langevin.mc_samples = 2
  langevin.antithetic = True
  langevin.proposal = "logistic"
  langevin.log_snr_center = 2.0
  langevin.log_snr_scale = 2.0
  langevin.control_variate = False
  langevin.reference_samples = 8
  langevin.gn_levels = 4
  # new (λ, ε) draws at every step instead of one set fixed along the chain (stochastic-gradient
  # Langevin; diffusion decoder only; excludes mala)
  langevin.fresh_draws = False
  # the gaussian warm-up's chain (em.gaussian_warmup_rounds): the gaussian decoder's recipe,
  # kept when a diffusion-decoder config changes em.langevin
  em.warm_langevin = ml_collections.ConfigDict(langevin.to_dict())
  # the gaussian warm-up's own β (0: bottleneck.beta's schedule) and shift augmentation of its
  # rounds (0: none); with shifts the warm-up leaves the persistent chains' slots empty, so
  # that EM's first visit of an example starts at z⁰ rather than at a shifted copy's code, or
  # (warm_fill_unshifted) fills them from its unshifted visits only; warm_shift_decay moves
  # each image with a probability that falls linearly from 1 at round 0 to 0 at the warm-up's end
  em.warm_beta = 0.0
  em.warm_shift = 0
  em.warm_fill_unshifted = False
  em.warm_shift_decay = False
  # persistent chains: > 0 keeps each training example's last z^K (this many slots, at least the
  # train split's size × (2 data.augment_shift + 1)², one per shifted copy) and continues its
  # chain there at the next visit, outside any warm-up
  em.chain_slots = 0
  # persistent chains: weight of the old value in each visit's update of the running mean of
  # (∇log π)², the `diagonal` step rule's per-example curvature
  em.curvature_decay = 0.5
  em.eval_refine_steps = 10  # Langevin steps from z⁰ at evaluation time
  # fit a latent DDPM prior (latent_prior.*) to the encoder's z⁰, one update per E-step, and
  # sample through it instead of N(0, I), which the codes' aggregate distribution need not match
  em.latent_prior = False

  # --- baselines (docs/method.md §2; diffenc_jax/baselines.py) -----------------------------
  # vae: the encoder encoders.GaussianEncoder (model.enc_channels, enc_features), β bottleneck's.
  # diffenc_joint: no fields of its own (model.enc_noise_draws, encoder_sampler, bottleneck).
  config.diffae = diffae = ml_collections.ConfigDict()
  # semantic encoder (encoders.DeterministicEncoder): conv = ConvEncoder(model.enc_channels,
  # model.enc_features), resnet = ResNetEncoder(resnet_*) (DiffAE's: 64, (1, 2, 4, 8, 8),
  # 2 blocks, attention at 16)
  diffae.encoder = "conv"  # conv | resnet
  diffae.resnet_channels = 64
  diffae.resnet_channel_mult = (1, 2, 4, 8, 8)
  diffae.resnet_num_res_blocks = 2
  diffae.resnet_attn_resolutions = (16,)
  config.latent_prior = latent_prior = ml_collections.ConfigDict()
  # a latent DDPM prior over z (for sampling), trained alongside on stop_gradient(z): DiffAE's,
  # and diffenc's and diffenc_joint's with em.latent_prior (diffenc_jax/latent_prior.py)
  latent_prior.hidden = 256
  latent_prior.blocks = 3
  latent_prior.lr = 1e-3
  # fit the prior to z standardised by running dataset statistics, de-standardise its samples
  # (DiffAE's z-normalisation)
  latent_prior.normalize = False
  latent_prior.steps = 50  # latent DDIM steps when sampling z from the prior
  # 0 = deterministic DDIM, 1 = ancestral (docs/method.md §1.9)
  latent_prior.eta = 1.0
  # the prior's DDIM clips its predicted z_0 to ±clip (0 = no clip): unclipped, the first
  # steps at log-SNR −15 blow the ε-network's error up by up to e^7.5
  latent_prior.clip = 10.0
  config.dmz = dmz = ml_collections.ConfigDict()
  dmz.temperature = 0.5  # relaxed-Bernoulli (Gumbel-sigmoid) temperature of the training codes
  # training codes rounded to {0, 1} in the forward pass (straight-through gradient)
  dmz.straight_through = False
  dmz.noise_scale = 1.0  # scale of the logistic noise of the training codes (1: binary concrete)
  dmz.input_perturbation = 0.1  # DDPM-IP's γ in the decoder's ε-MSE
  dmz.sample_steps = 10  # respaced image DDIM steps when decoding (reconstruction and samples)

  # --- optimisation -----------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128
  # batches per round: a method's round takes this many (E, B, ...) — EM's E-steps, one per batch
  train.batches_per_round = 1
  train.num_steps = 1500
  train.enc_lr = 1e-3
  train.dec_lr = 1e-3
  train.warmup_steps = 100
  # constant | cosine: after the warm-up, a cosine from the peak rate down to final_lr × it at
  # the last round (train.num_steps), for every network and method
  train.lr_schedule = "constant"
  train.final_lr = 0.0
  train.grad_clip = 1.0
  train.weight_decay = 0.0  # AdamW's decoupled decay of weight matrices and kernels (0 = Adam)
  train.ema_decay = 0.999
  train.log_every = 50
  train.eval_every = 500
  train.checkpoint_every = 500
  train.keep_checkpoints = 3
  train.mode = "train"  # train | eval | reconstruct | sample | encode

  # --- evaluation -------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 250
  # the held-out rate: path_kl, the path KL of the encoder's ancestral sampler against the
  # prior's (rate_steps steps, uniform in log-SNR or in time: rate_spacing), of that sampler's
  # last noisy state, which is also what psnr_zq decodes | diffusion_kl, the forward-noised
  # estimate from z⁰ (rate_samples draws), the KL of z⁰ blurred at λ_max where ε̂ is exact
  ev.rate_estimator = "path_kl"
  ev.rate_steps = 1000
  ev.rate_spacing = "logsnr"
  ev.rate_samples = 8
  ev.num_images = 64  # images in PNG grids
  ev.use_ema = False  # evaluate the EMA parameters instead of the raw ones
  ev.decoder_steps = 50  # diffusion decoder: image DDIM steps when decoding
  # held-out failure detectors beside PSNR: recon_acc, the share of reconstructions that a small
  # CNN (trained once on the train split for this many steps, cached in classifier_dir, default
  # ~/.cache/diffenc_jax; 0 = off) recognises as their digit; probe_acc, a linear probe of z⁰
  ev.classifier_steps = 400
  ev.classifier_dir = ""
  ev.probe = True
  return config
