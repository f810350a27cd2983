"""Upload the exported student of an existing vitkd run to the Hugging Face Hub, with a model card.

    python scripts/push_to_hub.py output/run --hub-model-id org/name [--hub-private]

The run dir needs ``config.yaml``, ``summary.json`` and ``student/`` (written at the end of training). The token
comes from ``HF_TOKEN`` or the cached login (``hf auth login``) and is never printed. Exit code 0 on success, 4 when
the upload failed (the message says how to retry; the local export is left as it was), 2 for a bad run dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vitkd.hub import push_run_to_hub  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dir', type=Path, help='a finished vitkd run dir (config.yaml, summary.json, student/)')
    p.add_argument('--hub-model-id', default=None, help='org/name or name (default: <your namespace>/<run dir name>)')
    p.add_argument('--hub-private', action='store_true', help='create the repo as private')
    args = p.parse_args(argv)
    if not (args.run_dir / 'config.yaml').is_file():
        print(f'error: {args.run_dir} is not a vitkd run dir (no config.yaml)', file=sys.stderr)
        return 2
    return push_run_to_hub(args.run_dir, args.hub_model_id, args.hub_private)


if __name__ == '__main__':
    sys.exit(main())
