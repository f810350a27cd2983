"""The tuned glibc heap of CPU runs (vitkd/cpu_malloc.py): no per-step page faults; --cpu-malloc picks it."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vitkd import devices
from vitkd.config import ConfigError

from vitkd.arguments import parse_args
REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'

# A small student's training steps in a fresh process; prints the minor page faults per step after 3 warm-up steps.
STEPS = '''
import resource, sys, torch
import torch.nn.functional as F
import vitkd
from vitkd.cpu_malloc import tune_malloc
if sys.argv[1] == 'tuned':
    assert tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
model = vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=2, embed_dim=96,
                             num_heads=3).train()
optimizer = torch.optim.AdamW(model.parameters())
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    cls_logits, dist_logits = model(images)
    (F.cross_entropy(cls_logits, labels) + F.cross_entropy(dist_logits, labels)).backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(3):
    step()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[3], resource.getpagesize())
'''


def faults_per_step(mode: str) -> tuple[int, int]:
    """(median minor page faults of one steady-state step, the page size) in a fresh process; glibc's heap settings
    taken from the environment (MALLOC_*) are removed so that each mode means the same on every machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'GLIBC_TUNABLES'))}
    out = subprocess.run([sys.executable, '-c', STEPS, mode], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    faults, page = out.stdout.split()[-2:]
    return int(faults), int(page)


@pytest.mark.skipif(not GLIBC, reason='tune_malloc sets glibc heap options; on macOS, Windows or musl it changes '
                    'nothing and returns False, so there are no page faults it could remove')
def test_tuned_heap_removes_the_page_faults_of_a_training_step():
    """Tuned, a steady-state step reuses the heap's memory: it faults in less than a sixteenth of one of its MLP
    activations (32 × 66 × 384 fp32 = 3.2 MB), where a heap that hands activations back to the kernel faults all of
    them in again each step. The count under glibc's defaults depends on the machine (its glibc's dynamic mmap
    threshold, transparent huge pages: one fault maps 2 MiB), so it is compared only as an upper bound: tuning never
    adds faults."""
    (system, page), (tuned, _) = faults_per_step('system'), faults_per_step('tuned')
    activation_pages = 32 * 66 * 384 * 4 / page
    assert tuned < activation_pages / 16, (tuned, activation_pages)
    assert tuned <= system, (tuned, system)


def test_cpu_malloc_option_chooses_whether_the_run_tunes_the_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, 'tune_malloc', lambda: calls.append(1) or True)
    for mode, expected in (('tuned', 1), ('system', 0)):
        calls.clear()
        cfg, _ = parse_args(['--cpu-malloc', mode, '--threads', '1', '--distill', 'none', '--teacher', 'none'])
        devices.make_accelerator(cfg)
        assert len(calls) == expected, mode
    cfg, _ = parse_args(['--distill', 'none', '--teacher', 'none'])
    assert cfg.cpu_malloc == 'tuned'
    with pytest.raises(ConfigError, match="--cpu-malloc: invalid choice: 'jemalloc'"):
        parse_args(['--cpu-malloc', 'jemalloc'])
