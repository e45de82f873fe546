"""Train or use a diffusion encoder: `python main.py --config configs/mnist.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.train.num_steps=100`; the mode is
`--config.train.mode=train|eval|reconstruct|sample|encode`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffenc_jax import runs, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(error: BaseException) -> str:
  """ml_collections wraps its message ('key' + newline + 'Did you mean ...') in KeyError and
  AttributeError: the innermost text on one line."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return " ".join(text.split())


def parse_flags(argv):
  """absl's parser (its one-line FATAL message for bad flag values), and one line for an
  override of a config field that does not exist."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    raise SystemExit(f"error: no such config field: {_one_line(e)}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    config = FLAGS.config
    config.get("train")  # a config file that failed to load raises here
  except OSError:
    raise SystemExit(f"error: cannot load the config file "
                     f"{config_flags.get_config_filename(FLAGS['config'])!r}: "
                     f"{_one_line(sys.exc_info()[1]).rsplit(']', 1)[-1].strip()}") from None
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except (train.UsageError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from None
  except runs.Stopped as e:  # SIGTERM / SIGINT: the current round is checkpointed
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(128 + e.signum) from None
  except KeyboardInterrupt as e:
    print(f"error: {e or 'interrupted'}", file=sys.stderr)
    raise SystemExit(130) from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
