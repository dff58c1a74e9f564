"""medflow: declarative pipelines for medical-imaging deep learning."""

import os as _os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX-512-class
# features; elsewhere (e.g. AMD EPYC with AVX2) training runs several times slower without
# them. The variable is read once, when TensorFlow is imported, so it is set here, before any
# medflow module can import TensorFlow. A value already in the environment wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
