"""diffenc_jax: the Diffusion Encoder and diffusion-autoencoder baselines in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="diffenc_jax",
    version="0.1.0",
    description="The Diffusion Encoder (EM-trained latent-diffusion encoder) and baselines in JAX",
    packages=find_packages(include=["diffenc_jax", "diffenc_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml_collections>=1.1.0",
        "absl-py>=2.5.1",
        "numpy>=2.4",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "tqdm>=4.70",
        "tensorboardX>=2.6.5",
        "pillow>=13.0",
        "matplotlib>=3.11",
        "mlxtend>=0.25.0",
        "scikit-learn>=1.9",
    ],
    extras_require={
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "nbclient>=0.11", "nbformat>=5.11",
                 "ipykernel>=7.4"],
        # benchmarks/vs_reference.py and vs_dit.py: the PyTorch originals (the user's checkouts of
        # phizaz/diffae and facebookresearch/DiT; DiT's models.py imports timm)
        "reference": ["torch>=2.0", "timm>=1.0"],
    },
)
