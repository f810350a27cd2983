"""vitkd's command line from a checkout: ``python main.py [options]`` is the installed ``vitkd`` command.

    python main.py                                   # embedded default: Fashion-MNIST, shipped teacher, ~4 minutes
    accelerate launch main.py --teacher regnety_160 --student deit_s_distilled --data-path /data/imagenet
    python main.py --help

The command lives in :mod:`vitkd.cli`, the training loop in :mod:`vitkd.engine`.
"""
import sys

from vitkd.cli import main

if __name__ == '__main__':
    sys.exit(main())
