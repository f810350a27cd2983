"""``python -m vitkd`` (and ``accelerate launch -m vitkd``): the ``vitkd`` command."""
import sys

from vitkd.cli import main

sys.exit(main())
