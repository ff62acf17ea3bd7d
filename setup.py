"""spade_jax: SPADE (GauGAN) semantic image synthesis in JAX/Flax."""
import setuptools

# Versions tested together (CPU, Python 3.11). Bump them together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "tensorboard==2.21.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "absl-py==2.5.1",
]

EXTRAS_REQUIRE = {
    # Only for reading reference PyTorch checkpoints (.pth) and torchvision
    # VGG19 / pytorch-fid Inception weight files. CPU build.
    "torch": ["torch==2.13.0"],
    # selenium drives Debian's chromium + chromium-driver in
    # tests/serve_browser_test.py (it never downloads a driver).
    "test": ["pytest==9.2.0", "selenium==4.50.0"],
}

setuptools.setup(
    name="spade_jax",
    version="0.1.0",
    description="SPADE / GauGAN semantic image synthesis in JAX and Flax",
    packages=setuptools.find_packages(include=["spade_jax", "spade_jax.*",
                                               "data_pipelines", "data_pipelines.*",
                                               "configs"]),
    # The web app's page (spade_jax.serve).
    package_data={"spade_jax": ["serve_page.html"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
