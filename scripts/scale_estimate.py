"""Per-GPU memory of every method's training state and the teacher cache's disk at ImageNet scale (not a test).

Builds the real modules on PyTorch's meta device (shapes and dtypes, no storage): the student, the teacher and, for
each registered method, the :class:`vitkd.distiller.Distiller` with that method's parts as its ``setup`` builds them
for ImageNet-1k (N = 1,281,167 images, K = 1000 classes, 224 px; CRD's banks, VkD's projector, …). Per GPU (every
process of a data-parallel run holds all of it, so the figures do not depend on the number of GPUs):

* ``trainable``: the student's and the method's trainable parameters, fp32, with their gradients and AdamW's two
  moments (4 × 4 B per parameter; the optimizer's step counters are negligible);
* ``buffers``: the method's buffers (CRD's memory banks and label table, …) and the student's;
* ``teacher``: its parameters and buffers held in bf16 (``--mixed-precision bf16``; fp32 doubles it).

Activations are not included: they depend on the batch (256 per GPU here), the precision and activation
checkpointing, and are measured by ``benchmarks/bench_gpu_step.py`` on a GPU. The teacher cache's disk comes from its
record layout (:func:`vitkd.teacher_cache.record_dtype`): top-10 logits, plus the teacher's pooled features when the
method reads them; per data epoch, for the default number of cached data epochs and for a 300-epoch schedule without
repetition; per writer (one record file per process and data epoch) for 8 and 64 GPUs.

    python scripts/scale_estimate.py --out docs/bench/scale_estimate
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import vitkd  # noqa: E402
from vitkd.distiller import Distiller, LossEntry  # noqa: E402
from vitkd.losses import LOSS_REGISTRY, RunInfo, create_loss  # noqa: E402
from vitkd.models import Teacher  # noqa: E402
from vitkd.teacher_cache import DEFAULT_EPOCHS, cache_bytes, record_dtype  # noqa: E402

IMAGENET_SAMPLES, IMAGENET_CLASSES, TOPK = 1_281_167, 1000, 10
GiB = 2 ** 30


def _bytes(tensors, dtype_bytes=None) -> int:
    return sum(t.numel() * (dtype_bytes or t.element_size()) for t in tensors)


def meta_teacher(teacher_name: str) -> Teacher:
    """The teacher wrapper built on the host (it compares its normalisation constants there), moved to meta."""
    return vitkd.create_teacher(teacher_name, IMAGENET_CLASSES, pretrained=False).to(torch.device('meta'))


def estimate(method: str, student_name: str, teacher: Teacher, batch: int, gpus: list[int],
             schedule_epochs: int) -> dict:
    """One method's row: per-GPU memory (bytes) and the cache's disk (bytes)."""
    with torch.device('meta'):
        student = vitkd.create_student(student_name, IMAGENET_CLASSES)
    teacher = copy.deepcopy(teacher)  # a method may adapt it (hooks, taps)
    info = RunInfo(num_classes=IMAGENET_CLASSES, num_samples=IMAGENET_SAMPLES, epochs=schedule_epochs,
                   steps_per_epoch=IMAGENET_SAMPLES // (batch * gpus[0]), input_size=(3, 224, 224),
                   student_name=student_name, train_labels=torch.arange(IMAGENET_SAMPLES) % IMAGENET_CLASSES)
    distiller = Distiller(student, teacher, [LossEntry(create_loss(method))], info)
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    method_params = sum(p.numel() for p in distiller.losses.parameters())
    row = dict(method=method, trainable_params=sum(p.numel() for p in trainable), method_params=method_params,
               trainable_bytes=_bytes(trainable, 4 * 4),  # fp32 weights, gradients and AdamW's two moments
               buffer_bytes=_bytes(list(distiller.buffers())),
               teacher_bytes=_bytes(list(teacher.model.parameters()) + list(teacher.model.buffers()), 2))
    row['total_bytes'] = row['trainable_bytes'] + row['buffer_bytes'] + row['teacher_bytes']
    spec = distiller.teacher_spec
    cacheable = distiller.needs_teacher and not (spec.blocks or spec.modules or spec.tokens)
    if cacheable:
        pooled_dim = teacher.model.num_features if spec.pooled else None
        dtype = record_dtype(IMAGENET_CLASSES, TOPK, bool(spec.logits), pooled_dim)
        per_process = {g: (IMAGENET_SAMPLES // batch // g) * batch for g in gpus}
        row['cache'] = dict(record_bytes=dtype.itemsize,
                            per_epoch_bytes={g: cache_bytes(per_process[g], g, 1, dtype) for g in gpus},
                            per_writer_file_bytes={g: cache_bytes(per_process[g], 1, 1, dtype) for g in gpus},
                            default_epochs=DEFAULT_EPOCHS, schedule_epochs=schedule_epochs)
    return row


def _fmt_gib(n: int) -> str:
    return f'{n / GiB:.2f}'


def markdown(rows: list[dict], failed: dict, args) -> str:
    g0, g1 = args.gpus
    lines = [f'Per GPU at ImageNet-1k ({IMAGENET_SAMPLES:,} images, {IMAGENET_CLASSES} classes, 224 px): student '
             f'`{args.student}`, teacher `{args.teacher}`, batch {args.batch} per GPU, {g0} and {g1} GPUs '
             '(the memory is the same for both: every process holds all of it). GiB; activations excluded. Cache: '
             f'top-{TOPK} logits (+ the pooled features where the method reads them), GB = 10^9 B.',
             '',
             '| method | trainable params (M) | weights+grads+AdamW (GiB) | buffers (GiB) | teacher bf16 (GiB) | total '
             f'(GiB) | cache B/sample | cache GB/epoch | cache GB, {DEFAULT_EPOCHS} epochs (default) | cache GB, '
             f'{args.schedule_epochs} epochs | file per writer, {g0} / {g1} GPUs (GB) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        c = r.get('cache')
        cache = ['not cacheable'] + [''] * 4 if c is None else [
            str(c['record_bytes']), f'{c["per_epoch_bytes"][g0] / 1e9:.2f}',
            f'{c["per_epoch_bytes"][g0] * DEFAULT_EPOCHS / 1e9:.1f}',
            f'{c["per_epoch_bytes"][g0] * args.schedule_epochs / 1e9:.0f}',
            f'{c["per_writer_file_bytes"][g0] / 1e9:.3f} / {c["per_writer_file_bytes"][g1] / 1e9:.3f}']
        lines.append('| ' + ' | '.join([r['method'], f'{r["trainable_params"] / 1e6:.1f}',
                                        _fmt_gib(r['trainable_bytes']), _fmt_gib(r['buffer_bytes']),
                                        _fmt_gib(r['teacher_bytes']), _fmt_gib(r['total_bytes']), *cache]) + ' |')
    if failed:
        lines += ['', 'Not estimated (the method\'s setup needs data or does not run on the meta device): '
                  + '; '.join(f'{k} ({v})' for k, v in sorted(failed.items()))]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--student', default='deit_small_distilled_patch16_224', help='timm student (DeiT-S)')
    parser.add_argument('--teacher', default='regnety_160', help='timm teacher (RegNetY-160)')
    parser.add_argument('--batch', type=int, default=256, help='per-GPU batch')
    parser.add_argument('--gpus', type=int, nargs=2, default=[8, 64], help='two data-parallel sizes')
    parser.add_argument('--schedule-epochs', type=int, default=300, help='training epochs (DeiT: 300)')
    parser.add_argument('--methods', nargs='*', default=None, help='default: every registered method')
    parser.add_argument('--out', default='output/scale_estimate', help='writes OUT.json and OUT.md')
    args = parser.parse_args(argv)
    methods = args.methods or sorted(set(LOSS_REGISTRY) - {'none'})
    rows, failed = [], {}
    teacher = meta_teacher(args.teacher)
    for method in methods:
        try:
            rows.append(estimate(method, args.student, teacher, args.batch, args.gpus, args.schedule_epochs))
        except Exception as e:  # noqa: BLE001 (reported in the table, the others go on)
            failed[method] = f'{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ""}'
            if len(methods) == 1:
                traceback.print_exc()
    command = 'python scripts/scale_estimate.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(command=command.strip(), date=datetime.date.today().isoformat(), student=args.student,
                  teacher=args.teacher, batch_per_gpu=args.batch, gpus=args.gpus, samples=IMAGENET_SAMPLES,
                  classes=IMAGENET_CLASSES, topk=TOPK, rows=rows, not_estimated=failed)
    out.with_suffix('.json').write_text(json.dumps(report, indent=1) + '\n')
    table = markdown(rows, failed, args)
    out.with_suffix('.md').write_text(f'`{command.strip()}` ({report["date"]})\n\n' + table)
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
