"""Train or use a diffusion encoder: `python main.py --config configs/mnist.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.train.num_steps=100`; the mode is
`--config.train.mode=train|eval|reconstruct|sample|encode`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from diffenc_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.UsageError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
