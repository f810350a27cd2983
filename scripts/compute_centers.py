"""Compute (or find in the cache) the teacher's class centres that ND / the "++" presets need.

Runs like a training run (``accelerate launch scripts/compute_centers.py ...`` splits the pass across the processes,
each on its GPU, the teacher in the run's precision). Takes the same options as ``main.py`` (``-c preset.yaml`` and
flags; only the data, teacher and student-input options matter), runs the frozen teacher once over the training set with the training crop, and writes the centres to the
cache (``$VITKD_CACHE_DIR/centers`` or ``~/.cache/vitkd/centers``; ``--cache-dir`` to choose), where a training run
with the same teacher, data and transform finds them. ``--out FILE.safetensors`` also copies them to a file for
``--loss-opts nd.centers=FILE.safetensors``.

Example::

    python scripts/compute_centers.py -c scripts/configs/deit++.yaml --data-path /data/imagenet
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitkd.build import build_data, build_student, build_teacher, student_data_spec  # noqa: E402
from vitkd.centers import centers_for_run, load_centers, save_centers  # noqa: E402
from vitkd.arguments import parse_args  # noqa: E402
from vitkd.errors import UsageError  # noqa: E402
from vitkd.devices import make_accelerator  # noqa: E402


def main(argv=None) -> int:
    """Usage errors become one line on stderr and exit code 2 (VITKD_DEBUG=1 shows tracebacks)."""
    try:
        return compute(argv)
    except UsageError as e:
        if os.environ.get('VITKD_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        return 2


def compute(argv=None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument('--cache-dir', default=None, help='centre cache folder (default: $VITKD_CACHE_DIR/centers)')
    own.add_argument('--out', default=None, help='also write the centres to this .safetensors file')
    args, rest = own.parse_known_args(argv)
    if '-h' in rest or '--help' in rest:
        own.print_help()
        print('\nAll other options are main.py\'s (python main.py --help).')
        return 0
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    cfg, _ = parse_args(rest)
    if cfg.teacher is None:
        print('error: class centres need a teacher (--teacher)', file=sys.stderr)
        return 2
    accelerator = make_accelerator(cfg)  # the device, the precision and the processes of a training run
    probe = build_student(cfg, num_classes=1)  # the student's input size and normalisation
    input_size, mean, std, _ = student_data_spec(cfg, probe)
    del probe
    _, _, spec = build_data(cfg, input_size, mean, std)
    teacher = build_teacher(cfg, spec.num_classes, mean, std).to(accelerator.device)
    if accelerator.mixed_precision in ('bf16', 'fp16'):  # the precision the training run's teacher will have
        teacher.cast(torch.bfloat16 if accelerator.mixed_precision == 'bf16' else torch.float16)
    centers, path, _ = centers_for_run(cfg, teacher, spec, accelerator, cache_dir=args.cache_dir)
    if not accelerator.is_main_process:
        return 0
    print(f'class centres {tuple(centers.shape)} of teacher {teacher.source} on {accelerator.num_processes} '
          f'process(es), {accelerator.device}, precision {accelerator.mixed_precision}: {path}')
    if args.out:
        save_centers(Path(args.out), centers, load_centers(path)[1])
        print(f'copied to {args.out} (use --loss-opts nd.centers={args.out})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
