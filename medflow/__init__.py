"""medflow: declarative pipelines for medical-imaging deep learning."""

__version__ = "0.1.0"
