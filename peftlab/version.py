"""peftlab's version (kept equal to pyproject.toml's by a test); a leaf module every layer may import."""

__version__ = "0.1.0"
