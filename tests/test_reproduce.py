"""scripts/reproduce.py's bookkeeping: weight-sweep rows, the seed-paired gains and the flag, the cell order."""
import importlib.util
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('reproduce', REPO / 'scripts' / 'reproduce.py')
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def _cell(avg, cls=None):
    return {'student': {'avg_top1': avg, 'cls_top1': avg if cls is None else cls}, 'img_per_s': 100.0}


def test_paired_gain_and_flag_follow_the_seeds():
    cells = {'none (no teacher)': [_cell(70.0), _cell(72.0), _cell(74.0)],
             'good': [_cell(71.0), _cell(73.5), _cell(75.2)],       # gains 1.0, 1.5, 1.2
             'noisy': [_cell(72.0), _cell(71.0), _cell(75.0)]}      # gains 2.0, -1.0, 1.0
    rows = {r['method']: r for r in reproduce.summarise(cells)}
    for name, gains in (('good', [1.0, 1.5, 1.2]), ('noisy', [2.0, -1.0, 1.0])):
        assert rows[name]['gain_mean'] == pytest.approx(sum(gains) / 3)
        mean = sum(gains) / 3
        assert rows[name]['gain_std'] == pytest.approx((sum((g - mean) ** 2 for g in gains) / 2) ** 0.5)
    assert rows['good']['beats_baseline'] and not rows['noisy']['beats_baseline']
    assert rows['good']['avg_std'] == pytest.approx(statistics.stdev([71.0, 73.5, 75.2]))
    assert 'gain_mean' not in rows['none (no teacher)']


def test_sweep_rows_put_the_weight_on_the_method_and_keep_its_options():
    methods = {'none (no teacher)': ['--distill', 'none', '--teacher', 'none'],
               'crd': ['--distill', 'crd', '--loss-opts', 'crd.nce_k=1024']}
    rows = reproduce.sweep(methods, [0.1, 0.01])
    assert rows == {'none (no teacher)': methods['none (no teacher)'],
                    'crd ×0.1': ['--distill', 'crd:0.1', '--loss-opts', 'crd.nce_k=1024'],
                    'crd ×0.01': ['--distill', 'crd:0.01', '--loss-opts', 'crd.nce_k=1024']}
    with pytest.raises(SystemExit, match='combines 2 methods'):
        reproduce.sweep({'KD++': ['--distill', 'kd', 'nd']}, [0.1])


def test_slow_cells_start_first_and_finished_cells_are_read_back(tmp_path):
    import json
    cells = [reproduce.Cell(name, extra, 0, tmp_path) for name, extra in
             [('KD', ['--distill', 'kd']), ('norm', ['--distill', 'norm']), ('KD++', ['--distill', 'kd', 'nd']),
              ('crd', ['--distill', 'crd:0.1', '--loss-opts', 'crd.nce_k=1024'])]]
    assert [c.name for c in sorted(cells, key=reproduce.Cell.cost, reverse=True)][:2] == ['norm', 'crd']
    for cell in cells:  # all finished: run_cells forks nothing and reads each summary
        cell.dir.mkdir(parents=True)
        cell.summary.write_text(json.dumps(_cell(50.0 + len(cell.name))))
    reproduce.run_cells(cells, type('Args', (), {'jobs': 2})())
    assert [c.result['student']['avg_top1'] for c in cells] == [52.0, 54.0, 54.0, 53.0]
    assert all(c.process is None for c in cells)


def test_cell_arguments_carry_the_table_student_budget_and_threads(tmp_path, monkeypatch):
    """A table cell: the table student with --stem-width, a subset of steps·128 images, the cell's threads."""
    monkeypatch.setattr(reproduce, 'own_cores', lambda: {0, 1})
    args = type('Args', (), {'embedded': False, 'steps': 150, 'jobs': 2, 'stem_width': 48})()
    argv = reproduce.cell_args(['--distill', 'kd'], 1, args, tmp_path / 'cell')
    kwargs = argv[argv.index('--student-kwargs') + 1:argv.index('--train-subset')]
    assert dict(kv.split('=') for kv in kwargs)['stem_width'] == '48'
    assert float(argv[argv.index('--train-subset') + 1]) * 6000 * 10 == pytest.approx(150 * 128, abs=10)
    assert argv[argv.index('--threads') + 1] == '1' and argv[argv.index('--seed') + 1] == '1'
    assert argv[argv.index('--max-steps') + 1] == '150' and argv[argv.index('--distill') + 1] == 'kd'
    cfg, _ = __import__('vitkd.arguments', fromlist=['parse_args']).parse_args(argv)
    assert cfg.student_kwargs['stem_width'] == 48 and cfg.threads == 1
