"""The papers' table, small: every method on the embedded default, same student, same step budget, several seeds.

    python scripts/reproduce.py                 # all methods x 3 seeds (about an hour on 2 CPU cores)
    python scripts/reproduce.py --quick         # the main methods x 1 seed (a few minutes)
    python scripts/reproduce.py --embedded --methods 'none (no teacher)' 'DeiT hard' VkD   # `python main.py` itself

Each cell is one ``main.py`` run on the embedded default data and teacher (Fashion-MNIST, the shipped
RegNetY) with a fixed small student (the embedded VkD-style student at width 64 with a 32-channel conv stem:
0.23 M parameters) for ``--steps``
optimizer steps of batch 128: one epoch, so one full warm-up + cosine schedule, over a stratified, seeded subset of
steps·128 training images (the images a partial epoch of the full set would see, but with the learning rate decayed
at the end). ``--jobs`` cells run side by side, each on cores/jobs threads (``--threads``), so img/s is per cell under
that shared load: compare it within a table.
Each cell is a process forked from this one after torch, timm and vitkd are imported (``main.main`` with the cell's
arguments, its output in ``<cell>.stdout.txt``), which saves every cell the ~5 s of imports; the slowest methods
start first.
Finished cells are skipped when the script is run again (results are kept per cell in ``<out>/cells/``), so an
interrupted reproduction resumes. Writes ``results.md`` (mean ± std top-1 of the cls / dist / avg heads, the avg-head
gain over the no-teacher student paired by seed, img/s, extra trainable parameters during training, peak memory),
``results.json`` and ``results.png`` in ``--out``. A method whose paired gain is not above its seed std is flagged.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vitkd.devices import own_cores  # noqa: E402

# the table's student: the embedded default's student (scripts/configs/embedded.yaml) at width 64, with a conv stem of
# --stem-width channels (default 32: the embedded student's 64-channel stem is ~35 % of this student's compute)
TABLE_STUDENT = ['--student-kwargs', 'img_size=28', 'patch_size=4', 'depth=4', 'embed_dim=64', 'num_heads=2',
                 'in_chans=1']
# budget-only option changes, stated in the table: CRD's 16384 negatives per anchor cost ~2 GB of gathered memory
# rows per step (4x the time of any other method on 2 cores), 1024 keeps the estimator and fits the budget; the
# Zoo's phases are epochs of a 200-epoch CIFAR run (AB/FSP: 50 init epochs before 200, FT: 30 paraphraser epochs
# before 200), so a one-epoch cell keeps their fraction of the run (0.2, 0.13) instead of spending all of it there;
# likewise BSS's attacks from epoch 10 of 200 (0.05 of the run, its schedule evaluated every step)
TABLE_OPTIONS = {'crd': ['--loss-opts', 'crd.nce_k=1024'], 'ab': ['--loss-opts', 'ab.init_epochs=0.2'],
                 'fsp': ['--loss-opts', 'fsp.init_epochs=0.2'], 'ft': ['--loss-opts', 'ft.paraphraser_epochs=0.13'],
                 'bss': ['--loss-opts', 'bss.start_epoch=0.05', 'bss.per_step=true']}
# method -> extra main.py arguments; the distill spec is the method's registered name(s)
QUICK_METHODS = {
    'none (no teacher)': ['--distill', 'none', '--teacher', 'none'],
    'DeiT hard': ['--distill', 'deit_hard'],
    'DeiT soft': ['--distill', 'deit_soft'],
    'KD': ['--distill', 'kd'],
    'VkD': ['--distill', 'vkd'],
    'DIST': ['--distill', 'dist'],
    'DKD': ['--distill', 'dkd'],
    'KD++ (KD + ND)': ['--distill', 'kd', 'nd'],
}


def all_methods() -> dict[str, list[str]]:
    """The quick set plus every other registered method by name, and the "++" presets that exist."""
    from vitkd.losses import list_losses
    methods = dict(QUICK_METHODS)
    covered = {'none', 'deit_hard', 'deit_soft', 'kd', 'vkd', 'dist', 'dkd'}
    # the "++" compositions on the embedded data (the presets in scripts/configs are the papers' ImageNet recipes)
    methods.update({'DIST++ (DIST + ND)': ['--distill', 'dist', 'nd'], 'DKD++ (DKD + ND)': ['--distill', 'dkd', 'nd'],
                    'DeiT++ (DeiT hard + ND)': ['--distill', 'deit_hard', 'nd']})
    for name, _ in list_losses():
        if name not in covered:
            methods[name] = ['--distill', name, *TABLE_OPTIONS.get(name, [])]
    return methods


def sweep(methods: dict[str, list[str]], weights: list[float]) -> dict[str, list[str]]:
    """Rows ``name ×w`` (distill spec ``name:w``) for every one-method row; the no-teacher row is kept as the baseline."""
    rows = {}
    for name, extra in methods.items():
        spec = extra[extra.index('--distill') + 1:]
        spec = spec[:next((i for i, a in enumerate(spec) if a.startswith('--')), len(spec))]
        if name.startswith('none'):
            rows[name] = extra
            continue
        if len(spec) != 1:
            raise SystemExit(f'--sweep-weights: row {name!r} combines {len(spec)} methods ({" ".join(spec)}); '
                             'sweep one-method rows only')
        at = extra.index('--distill') + 1
        for w in weights:
            rows[f'{name} ×{w:g}'] = [*extra[:at], f'{spec[0]}:{w:g}', *extra[at + 1:]]
    return rows


# relative cost of a cell (none = 1; two one-thread cells side by side): the slow ones start first so that the
# two queues end together
SLOW_FIRST = {'norm': 2.9, 'sobolev': 2.6, 'kdsvd': 2.3, 'crd': 2.0, 'bss': 2.0, 'dml': 1.9, 'reviewkd': 1.8,
              'lwm': 1.7}


def cell_threads(jobs: int) -> int:
    """Threads of each of ``jobs`` cells running side by side: the cores shared out."""
    return max(1, len(own_cores()) // jobs)


def cell_args(extra: list[str], seed: int, args, cell_dir: Path) -> list[str]:
    """main.py's arguments for one cell."""
    if args.embedded:  # `python main.py` as shipped: its student, one full epoch (no time cap)
        budget = []
    else:
        per_class = -(-args.steps * 128 // 10)  # Fashion-MNIST: 10 classes of 6000 training images
        budget = [*TABLE_STUDENT, f'stem_width={args.stem_width}',
                  '--train-subset', f'{min(1.0, per_class / 6000):.6f}', '--max-steps', str(args.steps)]
    return [*budget, *extra, '--seed', str(seed), '--threads', str(cell_threads(args.jobs)), '--epochs', '1',
            '--time-limit', '1000000', '--output-dir', str(cell_dir), '--overwrite', '--num-workers', '0',
            '--eval-every', '1000', '--log-every', '1000', '--no-eval-teacher']


def _run_main(argv: list[str], log_path: str) -> None:
    """The forked cell: ``main.main(argv)``, stdout and stderr into ``log_path``; exits with its exit code."""
    import main as vitkd_main
    os.environ['HF_HUB_OFFLINE'] = '1'
    os.chdir(REPO)
    with open(log_path, 'w') as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            code = vitkd_main.main(argv)
        except BaseException as e:  # an unexpected crash: its last line ends up in the table
            print(f'{type(e).__name__}: {e}', file=log)
            code = 1
        log.flush()
    sys.exit(code)


class Cell:
    """One table cell: its directory, and its forked process while it runs."""

    def __init__(self, name: str, extra: list[str], seed: int, out: Path):
        self.name, self.extra, self.seed = name, extra, seed
        slug = ''.join(c if c.isalnum() else '_' for c in name)
        self.dir = out / 'cells' / f'{slug}-seed{seed}'
        self.log = self.dir.parent / f'{self.dir.name}.stdout.txt'  # beside the cell: --overwrite moves its files
        self.process, self.start, self.result = None, 0.0, None

    @property
    def summary(self) -> Path:
        return self.dir / 'summary.json'

    def cost(self) -> float:
        spec = self.extra[self.extra.index('--distill') + 1:]
        return max(SLOW_FIRST.get(word.split(':')[0], 1.0) for word in spec)

    def launch(self, args) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.process = multiprocessing.get_context('fork').Process(
            target=_run_main, args=(cell_args(self.extra, self.seed, args, self.dir), str(self.log)))
        self.process.start()

    def collect(self) -> dict:
        code = self.process.exitcode
        if code != 0 or not self.summary.exists():
            lines = [line for line in self.log.read_text(errors='replace').splitlines() if line.strip()] \
                if self.log.exists() else []
            return {'error': (lines[-1:] or [f'exit code {code}'])[0], 'seconds': time.time() - self.start}
        return json.loads(self.summary.read_text())


def run_cells(cells: list[Cell], args) -> None:
    """Run the unfinished cells, ``args.jobs`` at a time, slowest first; finished ones are read back. Every fork
    happens on the main thread (no other thread holds a lock the child would inherit)."""
    todo = []
    for cell in cells:
        if cell.summary.exists():
            cell.result = json.loads(cell.summary.read_text())
        else:
            todo.append(cell)
    todo.sort(key=Cell.cost, reverse=True)
    running: list[Cell] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            cell = todo.pop(0)
            cell.launch(args)
            running.append(cell)
        multiprocessing.connection.wait([c.process.sentinel for c in running])
        for cell in [c for c in running if not c.process.is_alive()]:
            cell.process.join()
            running.remove(cell)
            cell.result = cell.collect()
            status = cell.result.get('error') or f'avg top-1 {cell.result["student"].get("avg_top1", 0):.2f}'
            print(f'{cell.name:<28} seed {cell.seed}: {status}', flush=True)


def summarise(cells: dict[str, list[dict]]) -> list[dict]:
    """Per method: mean ± std over seeds of each head's top-1, costs, and the avg-head gain over the no-teacher
    student paired by seed (the same seed gives both the same subset, initialisation and data order, so the paired
    gain's spread is the spread that matters); ``beats_baseline`` = mean gain > its std (> 0 with one seed)."""
    rows = []
    for name, runs in cells.items():
        ok = [r for r in runs if 'error' not in r]
        row = {'method': name, 'seeds': len(ok), 'errors': [r['error'] for r in runs if 'error' in r]}
        for head in ('cls', 'dist', 'avg'):
            values = [r['student'][f'{head}_top1'] for r in ok if f'{head}_top1' in r['student']]
            if values:
                row[f'{head}_mean'] = statistics.mean(values)
                row[f'{head}_std'] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ('img_per_s', 'extra_params', 'peak_memory_mb'):
            values = [r[key] for r in ok if key in r]
            if values:
                row[key] = statistics.mean(values)
        rows.append(row)
    base = next((name for name in cells if name.startswith('none')), None)
    for row in rows:
        if base is None or row['method'] == base:
            continue
        gains = [r['student']['avg_top1'] - b['student']['avg_top1'] for r, b in zip(cells[row['method']], cells[base])
                 if 'error' not in r and 'error' not in b]  # cells are listed in seed order
        if gains:
            row['gain_mean'] = statistics.mean(gains)
            row['gain_std'] = statistics.stdev(gains) if len(gains) > 1 else 0.0
            row['beats_baseline'] = row['gain_mean'] > row['gain_std']
    return rows


def markdown(rows: list[dict], args) -> str:
    def cell(row, head):
        return f'{row[f"{head}_mean"]:.2f} ± {row[f"{head}_std"]:.2f}' if f'{head}_mean' in row else '–'
    lines = ['| method | cls top-1 | dist top-1 | avg top-1 | avg gain vs none (paired) | img/s | extra params | '
             'peak memory (MB) | note |', '|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        note = '; '.join(row['errors']) if row['errors'] else ''
        if row.get('beats_baseline') is False:
            note = (note + '; ' if note else '') + '**flagged**: gain not above its seed std'
        gain = f'{row["gain_mean"]:+.2f} ± {row["gain_std"]:.2f}' if 'gain_mean' in row else '–'
        lines.append(f'| {row["method"]} | {cell(row, "cls")} | {cell(row, "dist")} | {cell(row, "avg")} | {gain} | '
                     f'{row.get("img_per_s", 0):.0f} | {int(row.get("extra_params", 0)):,} | '
                     f'{row.get("peak_memory_mb", 0):.0f} | {note} |')
    lines.append('')
    options = '; '.join(f'{name}: `{" ".join(extra)}`' for name, extra in TABLE_OPTIONS.items())
    if args.embedded:
        budget = 'The embedded default as `python main.py` runs it (its student, one epoch of 468 steps of batch 128)'
    else:
        budget = (f'{args.steps} steps of batch 128 per cell (one epoch, one warm-up + cosine, over a stratified subset '
                  f'of {args.steps * 128} training images), student '
                  f'`{" ".join(TABLE_STUDENT[1:])} stem_width={args.stem_width}`')
    lines.append(f'{budget}, seeds {", ".join(map(str, args.seeds))}, {args.jobs} cells side by side; budget-only '
                 f'options: {options}. Command: `python scripts/reproduce.py {shlex.join(sys.argv[1:])}` ({args.wall_minutes:.0f} min wall '
                 f'for the cells run now; finished cells are reused).')
    return '\n'.join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in rows if 'avg_mean' in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
    ax.bar(range(len(rows)), [r['avg_mean'] for r in rows], yerr=[r['avg_std'] for r in rows],
           color=['gray' if r['method'].startswith('none') else 'tab:blue' for r in rows])
    ax.set_xticks(range(len(rows)), [r['method'] for r in rows], rotation=60, ha='right', fontsize=8)
    lo = min(r['avg_mean'] for r in rows) - 5
    ax.set(ylabel='avg-head top-1 (%)', ylim=(max(0, lo), 100), title='vitkd methods on the embedded default')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='the main methods with one seed')
    p.add_argument('--steps', type=int, default=150, help='optimizer steps per cell (default 150)')
    p.add_argument('--seeds', type=int, nargs='+', default=None)
    p.add_argument('--stem-width', type=int, default=32,
                   help='conv-stem channels of the table student (default 32; 64 = the embedded student\'s stem)')
    p.add_argument('--methods', nargs='+', default=None, help='only these table rows (names as in the table)')
    p.add_argument('--sweep-weights', type=float, nargs='+', default=None, metavar='W',
                   help='instead of the rows themselves, each selected one-method row at weights W (its distill spec '
                        'becomes name:W, a factor on the method\'s default weight), e.g. --methods at --sweep-weights '
                        '0.1 0.01')
    p.add_argument('--embedded', action='store_true',
                   help='cells are the embedded default itself (its student, one full epoch) instead of the table budget')
    p.add_argument('--jobs', type=int, default=2, help='cells run side by side (default 2)')
    p.add_argument('--out', default='output/reproduce')
    args = p.parse_args(argv)
    if 'torch' not in sys.modules:  # OpenMP reads these once, when torch loads: every forked cell inherits them
        os.environ['OMP_NUM_THREADS'] = str(cell_threads(args.jobs))
        os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'  # as main.py sets it (idle OpenMP threads must not spin)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = QUICK_METHODS if args.quick else all_methods()
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    if not methods:
        raise SystemExit(f'--methods {" ".join(args.methods)}: no such table row (rows: '
                         f'{", ".join(QUICK_METHODS if args.quick else all_methods())})')
    if args.sweep_weights:
        methods = sweep(methods, args.sweep_weights)
    out = Path(args.out)
    jobs = [(name, extra, seed) for name, extra in methods.items() for seed in args.seeds]

    cells = [Cell(name, extra, seed, out) for name, extra, seed in jobs]
    import main  # noqa: F401  (imported once here: every forked cell inherits torch, timm and vitkd)
    start = time.time()
    run_cells(cells, args)
    args.wall_minutes = (time.time() - start) / 60
    by_method: dict[str, list[dict]] = {}
    for cell in cells:
        by_method.setdefault(cell.name, []).append(cell.result)
    rows = summarise(by_method)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(rows, indent=2) + '\n')
    table = markdown(rows, args)
    (out / 'results.md').write_text(table + '\n')
    plot(rows, out / 'results.png')
    print(table)


if __name__ == '__main__':
    main()
