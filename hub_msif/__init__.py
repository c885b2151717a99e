"""hub_msif: multi-stage influence functions with EK-FAC factors shared on the Hugging Face Hub."""

__version__ = "0.1.0"
