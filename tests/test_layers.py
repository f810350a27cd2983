"""The layering is a fact a tool checks: import-linter's contracts (``.importlinter``) hold for the package, and a
change that imports upward (closing a circle) breaks them. The check runs on a copy of the package, so the second
test can add an upward import without touching the checkout."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name('lint-imports'))]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300,
                          env={'PYTHONPATH': str(root), 'PATH': '/usr/bin:/bin'})


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / 'tree'
    shutil.copytree(REPO / 'vitkd', root / 'vitkd', ignore=shutil.ignore_patterns('__pycache__', '_shipped'))
    shutil.copy(REPO / '.importlinter', root / '.importlinter')
    return root


def test_the_package_keeps_its_layer_contracts(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count('KEPT') == 3 and 'BROKEN' not in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = _copy(tmp_path)
    models = root / 'vitkd' / 'models.py'
    models.write_text(models.read_text() + '\nfrom .run import Run  # a part reaching up into the orchestration\n')
    result = _lint(root)
    assert result.returncode != 0
    assert 'vitkd.models is not allowed to import vitkd.run' in result.stdout
