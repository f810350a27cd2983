"""VkD's Cayley projector: torch's orthogonal parametrisation against vitkd's own (not a test).

Both give the same W from the same tensors (:func:`vitkd.losses.vkd.cayley_frame`); torch solves an n×n system
with n right-hand sides (n = D_t), vitkd a k×k one (k = D_s) plus one n×n by n×k product. One timed iteration is what a
training step does with the projector: build W from the trained tensor, project a batch of student vectors
[B, D_s] → [B, D_t], and back-propagate a loss on the projection into the trained tensor. The two variants alternate
within each round (a change of machine load hits both alike); the report gives each one's median milliseconds, the
median of the per-round speed ratios with their range, and the largest difference between the two W and the two
gradients of the trained tensor in that run.

    python benchmarks/bench_vkd_projector.py --out docs/bench/bench_vkd_projector.json
    python benchmarks/bench_vkd_projector.py --student-dim 16 --teacher-dim 48 --rounds 2 --out /tmp/tiny.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # as main.py: spinning OpenMP threads crawl on shared cores

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.utils.parametrizations import orthogonal  # noqa: E402

from _common import write_report  # noqa: E402
from vitkd.losses.vkd import build_projector  # noqa: E402

VARIANTS = ('torch_cayley', 'vitkd_cayley')


def build(variant: str, student_dim: int, teacher_dim: int, seed: int) -> nn.Module:
    """The projector of ``variant``, initialised from ``seed`` (both variants get the same W₀ and base)."""
    torch.manual_seed(seed)
    if variant == 'torch_cayley':
        return orthogonal(nn.Linear(student_dim, teacher_dim, bias=False), orthogonal_map='cayley',
                          use_trivialization=True)
    return build_projector('orthogonal_cayley', student_dim, teacher_dim)


def step(projector: nn.Module, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W from the trained tensor, the projection [B, D_t], a SmoothL1 loss and its backward; returns the gradient."""
    original = projector.parametrizations.weight.original
    original.grad = None
    loss = nn.functional.smooth_l1_loss(projector(student), target)
    loss.backward()
    return original.grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--student-dim', type=int, default=384, help='D_s (DeiT-S: 384)')
    parser.add_argument('--teacher-dim', type=int, default=3024, help='D_t (RegNetY-160: 3024)')
    parser.add_argument('--batch', type=int, default=128, help='student vectors per step')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds (each times both variants once)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: every core)')
    parser.add_argument('--out', default='output/bench_vkd_projector.json')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    projectors = {v: build(v, args.student_dim, args.teacher_dim, seed=0) for v in VARIANTS}
    generator = torch.Generator().manual_seed(1)
    trained = 0.05 * torch.randn(args.teacher_dim, args.student_dim, generator=generator)  # a W away from W₀
    for projector in projectors.values():
        with torch.no_grad():
            projector.parametrizations.weight.original.copy_(trained)
    student = torch.randn(args.batch, args.student_dim, generator=generator)
    target = torch.randn(args.batch, args.teacher_dim, generator=generator)
    grads = {v: step(p, student, target).clone() for v, p in projectors.items()}  # warm-up, and the comparison
    with torch.no_grad():
        weights = {v: p.weight for v, p in projectors.items()}
    times = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % 2:] + VARIANTS[:r % 2]:  # alternate which variant goes first
            start = time.perf_counter()
            step(projectors[v], student, target)
            times[v].append(time.perf_counter() - start)
    ratios = [t / v for t, v in zip(times['torch_cayley'], times['vitkd_cayley'])]
    report = dict(
        command='python ' + ' '.join([f'benchmarks/{Path(__file__).name}', *(argv if argv is not None else
                                                                              sys.argv[1:])]),
        date=datetime.date.today().isoformat(), machine=f'{platform.machine()} CPU, {os.cpu_count()} cores',
        torch=torch.__version__, threads=torch.get_num_threads(), student_dim=args.student_dim,
        teacher_dim=args.teacher_dim, batch=args.batch, rounds=args.rounds, dtype='float32',
        ms={v: 1000 * statistics.median(t) for v, t in times.items()},
        ms_per_round={v: [round(1000 * x, 3) for x in t] for v, t in times.items()},
        speedup_vitkd_over_torch=statistics.median(ratios), speedup_range=[min(ratios), max(ratios)],
        max_abs_weight_difference=float((weights['torch_cayley'] - weights['vitkd_cayley']).abs().max()),
        max_abs_grad_difference=float((grads['torch_cayley'] - grads['vitkd_cayley']).abs().max()),
        max_abs_grad=float(grads['torch_cayley'].abs().max()))
    write_report(report, args.out)
    print(f"torch {report['ms']['torch_cayley']:.1f} ms, vitkd {report['ms']['vitkd_cayley']:.1f} ms per "
          f"forward+backward: {report['speedup_vitkd_over_torch']:.1f}x")
    return 0


if __name__ == '__main__':
    sys.exit(main())
