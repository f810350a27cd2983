"""The benchmarks run at tiny size on CPU (so they cannot rot) and report figures consistent with their own timings."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
from bench_jpeg_e2e import steady_rate  # noqa: E402


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f'{script}.json'
    proc = subprocess.run([sys.executable, str(BENCH / f'{script}.py'), *args, '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_speed_ratios_are_medians_of_per_round_ratios():
    times = {'fast': [1.0, 2.0, 1.0], 'slow': [2.0, 2.0, 4.0], 'failed': []}
    ratios, spread = _common.speed_ratios(times, [('fast', 'slow'), ('fast', 'failed')])
    assert ratios == {'fast / slow': 2.0}  # per round 2, 1, 4
    assert spread['fast / slow'][0] <= 2.0 <= spread['fast / slow'][1]
    img_per_s, extremes = _common.rates({'fast': [1.0, 2.0, 1.0]}, batch=8)
    assert img_per_s == {'fast': 8.0} and extremes == {'fast': [4.0, 8.0]}


def test_quartiles_leave_the_extremes_from_four_rounds_on():
    assert _common.quartiles([3.0, 1.0, 2.0]) == [1.0, 3.0]  # three rounds: the quartiles are min and max
    rounds = [5.0, 1.0, 4.0, 2.0, 3.0, 7.0, 6.0]
    low, high = _common.quartiles(rounds)
    assert (low, high) == (2.0, 6.0)  # ranks (n + 1) / 4 = 2 and 3 (n + 1) / 4 = 6 of the sorted rounds
    assert _common.MIN_ROUNDS_FOR_QUARTILES == 4
    low, high = _common.quartiles([1.0, 2.0, 3.0, 4.0])
    assert 1.0 < low and high < 4.0


def test_steady_rate_recovers_the_rate_between_log_records(tmp_path):
    # batch 10: step 10 logged at 5 s, step 20 at 7 s, step 30 at 9 s (running rates since the epoch began)
    records = [dict(kind='step', epoch=s / 100, step=s, img_per_s=10 * s / t) for s, t in ((10, 5.0), (20, 7.0),
                                                                                            (30, 9.0))]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    steady = steady_rate(tmp_path / 'log.jsonl')
    assert steady['img_per_s'] == pytest.approx(200 / 4.0)  # 20 steps of 10 images in the 4 s after step 10
    assert steady['from_step'] == 10


@pytest.mark.slow
@pytest.mark.ci_once
def test_gpu_step_benchmark_tiny(tmp_path):
    report = _run('bench_gpu_step', tmp_path, '--tiny', '--students', 'small', '--rounds', '2', '--steps', '1',
                  '--warmup', '1', '--vkd-maps', 'orthogonal', '--ablation', '--budget-s', '600')
    assert not report['failed'] and not report['skipped']
    assert report['setup']['cuda'] == {'tf32': True, 'cudnn_benchmark': True}
    extras = report['results']['deit_small extras']
    t = extras['seconds_per_step']
    assert set(t) == {'vitkd_live', 'vitkd_live-no_grad_norm', 'vitkd_live-no_terms', 'vitkd_live-no_guard',
                      'vitkd_live-no_extras'}
    for e in ('grad_norm', 'terms', 'guard', 'extras'):
        per_round = [1 - w / a for a, w in zip(t['vitkd_live'], t[f'vitkd_live-no_{e}'])]
        assert extras['extras_share_of_step'][e]['share'] == pytest.approx(statistics.median(per_round))
    res = report['results']['deit_small eager']
    times, batch = res['seconds_per_step'], report['setup']['batch']
    assert set(times) == {'student_only', 'vitkd_live', 'vitkd_cached', 'timm_task', 'vkd_orthogonal', 'vkd_linear'}
    for name, ts in times.items():
        assert len(ts) == 2 and min(ts) > 0
        assert res['img_per_s'][name] == pytest.approx(batch / statistics.median(ts))
    for pair in ('vitkd_live / timm_task', 'vitkd_cached / student_only', 'vkd_orthogonal / vitkd_live'):
        a, b = pair.split(' / ')
        assert res['ratios'][pair] == pytest.approx(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])))
    share = statistics.median(1 - lin / t for t, lin in zip(times['vkd_orthogonal'], times['vkd_linear']))
    assert res['projector_share_of_step']['orthogonal'] == pytest.approx(share)
    peak = res['peak_memory_mb']
    assert res['ratios']['peak memory vitkd_live / timm_task'] == pytest.approx(peak['vitkd_live'] / peak['timm_task'])
    for goal in report['goals']:
        assert goal['group'] == 'deit_small eager'
        key = goal['goal'].rsplit(' ', 2)[0]
        assert goal['value'] == pytest.approx(res['ratios'][key], abs=1e-3)


@pytest.mark.slow
@pytest.mark.ci_once
def test_jpeg_e2e_benchmark_tiny(tmp_path):
    report = _run('bench_jpeg_e2e', tmp_path, '--tiny', '--num-workers', '0')
    loader, step, e2e = report['loader_only'], report['step_only'], report['end_to_end']
    assert loader['img_per_s'] > 0 and step['img_per_s'] > 0 and e2e['img_per_s'] > 0
    assert e2e['steps'] == report['setup']['steps']
    assert step['img_per_s'] == pytest.approx(report['setup']['batch'] / statistics.median(step['seconds_per_step']))
    assert report['ratios']['end_to_end / step_only'] == pytest.approx(e2e['img_per_s'] / step['img_per_s'])
    assert report['goal']['met'] == (report['ratios']['end_to_end / step_only'] >= 0.9)


@pytest.mark.slow
@pytest.mark.ci_once
def test_whole_program_benchmark_tiny(tmp_path):
    report = _run('bench_whole_program', tmp_path, '--tiny', '--rounds', '1')
    vitkd, timm = report['runs']['vitkd'][0], report['runs']['timm'][0]
    for run in (vitkd, timm):
        assert run['wall_s'] > 0 and run['train_img_per_s'] > 0 and run['peak_rss_mb'] > 0
    for key in ('wall_s', 'train_img_per_s', 'peak_rss_mb'):
        assert report['ratios'][f'vitkd / timm {key}'] == pytest.approx(vitkd[key] / timm[key])
