"""Shared test set-up: a persistent compilation cache, so that the many identical programs the
training tests compile (one Trainer per run) are compiled once per session."""

import tempfile

import jax

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="diffenc_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
