"""The ``peftlab`` command line (usage: ``peftlab --help``; the text is in ``peftlab.cli.main``).

One module per command family: ``train``, ``adapters`` (eval, merge, export, import), ``decoding`` (generate, chat,
baseline), ``compose``, ``serve`` (the HTTP server), ``bench`` and ``catalog`` (methods, assets); ``options`` turns
config dataclasses into flags and reads config files; ``main`` parses the global options, dispatches and turns
errors into one line.
"""

from .main import main
from .options import read_config_file

__all__ = ["main", "read_config_file"]
