"""image-gateway: an OpenAI-compatible, streaming gateway for POST /v1/images/edits."""

__version__ = "0.1.0"
