"""Shared test set-up: XLA:CPU's backend at its lowest optimisation level and a persistent
compilation cache. The tests compile many small programs and run each a few times, so LLVM's
optimisation passes, more than the running, set their time; the cache compiles the many
identical programs of the training tests (one Trainer per run) once per session. Neither
changes what a program computes beyond float rounding, and the tests that spawn processes pass
FAST_COMPILE on with their own XLA_FLAGS."""

import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"
# for `jax.jit(..., compiler_options=RUN_OPTIMISED)`: a program that runs long enough for the
# optimised code to repay its compilation (a long chain), compiled with LLVM's -O2 passes
RUN_OPTIMISED = {"xla_backend_optimization_level": 2}
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads it when it starts)

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="diffenc_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
