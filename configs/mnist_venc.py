"""configs/mnist.py with a v-predicting encoder trained by the v-MSE.

The latent denoiser outputs v̂ and ε̂ = σ_t z_t + α_t v̂, so a network that outputs 0 is the
exact predictor of the prior N(0, I); the v-MSE weighting trains it at every log-SNR, including
the top of the latent schedule, where the path-KL rate of a code is paid (docs/rate.md).
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.model.enc_parameterization = "v"
  config.model.enc_weighting = "v"
  return config
