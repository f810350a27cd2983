"""``scripts/scale_estimate.py``: its per-GPU sizes against sizes written out by hand for a small DeiT and RegNetY."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))

import scale_estimate  # noqa: E402
from scale_estimate import IMAGENET_CLASSES, IMAGENET_SAMPLES, estimate, meta_teacher  # noqa: E402

STUDENT, TEACHER = 'deit_tiny_distilled_patch16_224', 'regnety_002'
TEACHER_WIDTH = 368  # regnety_002's pooled features


def test_crd_and_kd_rows_match_sizes_written_out_by_hand(tmp_path):
    teacher = meta_teacher(TEACHER)
    with torch.device('meta'):
        student_params = sum(p.numel() for p in scale_estimate.vitkd.create_student(STUDENT, IMAGENET_CLASSES)
                             .parameters())
    teacher_bytes = 2 * sum(t.numel() for t in [*teacher.model.parameters(), *teacher.model.buffers()])
    kd = estimate('kd', STUDENT, teacher, 256, [8, 64], 300)
    assert kd['trainable_params'] == student_params and kd['trainable_bytes'] == 16 * student_params
    assert kd['teacher_bytes'] == teacher_bytes and kd['buffer_bytes'] == 0
    # index, seed, mix seed, check (28 B) + top-10 fp16 logits, their int16 classes and the fp32 rest logit
    assert kd['cache']['record_bytes'] == 28 + 10 * 2 + 10 * 2 + 4
    records_8 = IMAGENET_SAMPLES // 256 // 8 * 256
    assert kd['cache']['per_writer_file_bytes'][8] == 4096 + records_8 * 72

    crd = estimate('crd', STUDENT, teacher, 256, [8, 64], 300)
    feat, n = 128, IMAGENET_SAMPLES
    embeds = (192 + 1) * feat + (TEACHER_WIDTH + 1) * feat  # the two linear embeddings (DeiT-Ti width 192)
    assert crd['trainable_params'] == student_params + embeds
    banks, labels, z = 2 * n * feat * 4, n * 8, 2 * 4
    grouping = n * 8 + 2 * (IMAGENET_CLASSES + 1) * 8  # class order, first position and size of each class
    assert crd['buffer_bytes'] == banks + labels + z + grouping
    assert crd['cache']['record_bytes'] == 28 + 2 * TEACHER_WIDTH  # pooled features only, bf16


def test_the_script_writes_its_table_and_json(tmp_path):
    out = tmp_path / 'scale'
    scale_estimate.main(['--student', STUDENT, '--teacher', TEACHER, '--methods', 'kd', 'fitnet', '--out', str(out)])
    table = out.with_suffix('.md').read_text()
    assert '| kd | 5.9 |' in table and '| fitnet |' in table and 'not cacheable' in table
    assert '"method": "kd"' in out.with_suffix('.json').read_text()
