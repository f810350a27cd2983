"""vitkd's version: the package metadata's (``pyproject.toml`` reads it here), the model cards' install line and the
teacher cache's header. At the bottom of the package, so any layer can read it."""
__version__ = '0.1.0'
