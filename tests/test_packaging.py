"""vitkd as a package: pyproject.toml agrees with requirements.txt, and a wheel installed in a fresh venv outside the
checkout gives the ``vitkd`` command (with its shipped presets and teacher) and a ``vitkd`` that timm loads pushed
students with, through the model card's own instructions."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import vitkd
from test_export_hub import TOKEN, FakeHub, make_image_folder

REPO = Path(__file__).resolve().parents[1]
# What a wheel is built from (pyproject.toml names the rest of the checkout nowhere).
SOURCES = ('pyproject.toml', 'README.md', 'vitkd', 'scripts/configs', 'checkpoints/fmnist_regnety_002',
           'checkpoints/fmnist_dense_detect_teacher', 'checkpoints/fmnist_dense_segment_teacher')
STUDENTS = {  # repo -> (student, kwargs, method): a VkD student and one of timm's DeiT students
    'org/vkd-tiny': ('deit_ti_distilled', dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2), 'vkd'),
    'org/deit-tiny': ('deit_tiny_distilled_patch16_224', dict(img_size=32, patch_size=8, depth=2, embed_dim=48,
                                                              num_heads=2), 'deit_hard'),
}


def _requirement(line: str) -> tuple[str, str]:
    """(normalised name, version spec) of one requirement line, comments dropped."""
    line = line.split('#', 1)[0].strip()
    name, spec = re.match(r'([A-Za-z0-9_.-]+)\s*(.*)', line).groups()
    return re.sub(r'[-_.]+', '-', name).lower(), spec.replace(' ', '')


def test_pyproject_floors_are_requirements_txt_s():
    """Every dependency has the floor requirements.txt gives it; torch/torchvision, pinned there to this platform's
    builds, satisfy pyproject's floors; the extras hold the rest of requirements.txt."""
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    declared = dict(_requirement(r) for r in project['dependencies'])
    extras = dict(_requirement(r) for group in project['optional-dependencies'].values() for r in group)
    pinned = dict(_requirement(line) for line in (REPO / 'requirements.txt').read_text().splitlines()
                  if line.split('#', 1)[0].strip())
    for name, spec in pinned.items():
        wanted = declared.get(name, extras.get(name))
        assert wanted is not None, f'{name} is in requirements.txt but not in pyproject.toml'
        if spec.startswith('=='):
            version = tuple(int(p) for p in re.findall(r'\d+', spec)[:3])
            floor = tuple(int(p) for p in re.findall(r'\d+', wanted)[:3])
            assert wanted.startswith('>=') and version >= floor, (name, spec, wanted)
        else:
            assert wanted == spec, (name, spec, wanted)
    assert set(declared) <= set(pinned), set(declared) - set(pinned)
    assert project['scripts'] == {'vitkd': 'vitkd.cli:main'}


def test_main_py_is_the_vitkd_command():
    import main
    import vitkd.cli
    assert main.main is vitkd.cli.main


# ---- the wheel, installed elsewhere ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A wheel built from a copy of the sources, installed offline into a new venv that reuses this interpreter's
    packages (a .pth file) but not the checkout."""
    base = tmp_path_factory.mktemp('pkg')
    source = base / 'source'
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, source / name)
    wheels = base / 'wheels'
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                            '-w', str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob('vitkd-*.whl'))
    env_dir = base / 'venv'
    venv.create(env_dir, with_pip=True)
    python = env_dir / 'bin' / 'python'
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    (Path(site) / 'reuse_dependencies.pth').write_text('\n'.join(sorted(ours)) + '\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'PIP_', 'PYTHON'))}
    env.update(PATH=f'{env_dir / "bin"}{os.pathsep}{env["PATH"]}', PIP_NO_INDEX='1', PIP_NO_DEPS='1',
               PIP_FIND_LINKS=str(wheels), OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')
    install = subprocess.run([str(python), '-m', 'pip', 'install', '--ignore-installed', str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = base / 'elsewhere'
    work.mkdir()
    return dict(base=base, python=python, env=env, work=work, wheel=wheel, site=Path(site))


def _run(cmd, installed, extra_env=None, timeout=300):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=installed['work'],
                          env={**installed['env'], **(extra_env or {})}, timeout=timeout)


@pytest.mark.slow
@pytest.mark.ci_once
def test_the_wheel_gives_the_package_the_command_and_its_shipped_files(installed):
    probe = _run([installed['python'], '-c', 'import json, timm, vitkd, vitkd.config as c; print(json.dumps(dict('
                  'file=vitkd.__file__, registered="deit_ti_distilled" in timm.list_models(), '
                  'presets=c.preset_names(), embedded=c.embedded_default()["teacher"], '
                  'dense=[c.embedded_default(t)["teacher"] for t in ("detect", "segment")])))'], installed)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.splitlines()[-1])
    assert Path(seen['file']).is_relative_to(installed['site']) and seen['registered']
    assert seen['presets'] == sorted(p.stem for p in (REPO / 'scripts' / 'configs').glob('*.yaml'))
    teacher = Path(seen['embedded'])
    assert teacher.is_relative_to(installed['site']) and (teacher / 'model.safetensors').read_bytes() == \
        (REPO / 'checkpoints' / 'fmnist_regnety_002' / 'model.safetensors').read_bytes()
    for folder, task in zip(seen['dense'], ('detect', 'segment')):
        assert Path(folder).is_relative_to(installed['site']) and (Path(folder) / 'model.safetensors').read_bytes() == \
            (REPO / 'checkpoints' / f'fmnist_dense_{task}_teacher' / 'model.safetensors').read_bytes()
    for argv in (['--list-losses'], ['--lr', '-1']):  # the installed command answers as the checkout's main.py does
        installed_run = _run([installed['python'].parent / 'vitkd', *argv], installed)
        checkout_run = subprocess.run([sys.executable, str(REPO / 'main.py'), *argv], capture_output=True, text=True,
                                      cwd=REPO, timeout=300)
        assert installed_run.returncode == checkout_run.returncode and installed_run.stdout == checkout_run.stdout
        assert installed_run.stderr.strip().splitlines()[-1:] == checkout_run.stderr.strip().splitlines()[-1:]
    assert checkout_run.returncode == 2 and checkout_run.stderr.startswith('error: --lr')


def _card_blocks(card: str) -> tuple[str, str]:
    """The model card's install line(s) and its python snippet ("How to load")."""
    how = card.split('## How to load\n', 1)[1]
    return (re.search(r'```bash\n(.*?)```', how, flags=re.S).group(1),
            re.search(r'```python\n(.*?)```', how, flags=re.S).group(1))


@pytest.mark.slow
@pytest.mark.ci_once
def test_pushed_students_load_with_the_model_card_s_snippet(installed):
    """Tiny runs of the installed ``vitkd`` push a VkD and a DeiT student to a Hub-API server on 127.0.0.1; in a
    fresh HF cache the card's install line and python snippet, run as written, give the trained students' logits."""
    hub = FakeHub()
    try:
        data = make_image_folder(installed['base'] / 'images')
        hub_vars = dict(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_TELEMETRY='1')
        for repo, (student, kwargs, method) in STUDENTS.items():
            out = installed['base'] / repo.replace('/', '_')
            result = _run([installed['python'].parent / 'vitkd', '--data-path', data, '--input-size', '32',
                           '--student', student, '--student-kwargs', *[f'{k}={v}' for k, v in kwargs.items()],
                           '--teacher', 'regnety_002', '--no-teacher-pretrained', '--distill', method, '--epochs', '1',
                           '--batch-size', '8', '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--output-dir',
                           out, '--push-to-hub', '--hub-model-id', repo], installed,
                          dict(hub_vars, HF_HOME=str(installed['base'] / 'hf_train')))
            assert result.returncode == 0, result.stderr[-3000:]
            install_line, snippet = _card_blocks(hub.repos[repo]['README.md'].decode())
            assert install_line.strip() == ('pip install vitkd==' + vitkd.__version__ if 'vkd' in repo
                                            else 'pip install timm')
            assert ('import vitkd' in snippet) == ('vkd' in repo)
            fresh = dict(hub_vars, HF_HOME=str(installed['base'] / f'hf_{out.name}'))
            pip = _run(['bash', '-c', install_line], installed, fresh)  # offline: PIP_FIND_LINKS holds the wheel
            assert pip.returncode == 0, pip.stderr[-3000:]
            Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(7)).numpy()).save(
                installed['work'] / 'image.png')
            # The snippet's model is also run in float64 on both sides: the float32 logits of two processes may
            # differ in the last bits (a BLAS may split a sum by the buffers' alignment), while a float64 forward of
            # the same weights agrees to about depth × width × 2**-53 of the logits, far below the ~2**-24 relative
            # change that any float32 weight differing by one ulp would make.
            record = ('\nfrom safetensors.torch import save_file\n'
                      'with torch.no_grad():\n'
                      '    logits64 = model.double()(transform(image).unsqueeze(0).double())\n'
                      "save_file({'logits': logits, 'logits64': logits64, 'input': transform(image).unsqueeze(0)},"
                      " 'seen.safetensors')\n")
            loaded = _run([installed['python'], '-c', snippet + record], installed, fresh)
            assert loaded.returncode == 0, loaded.stderr[-3000:]
            seen = load_file(str(installed['work'] / 'seen.safetensors'))
            with torch.no_grad():
                expected = _trained_student(out, student, kwargs).double()(seen['input'].double())
            assert seen['logits'].shape == (1, 8) and seen['logits'].dtype == torch.float32, repo
            tolerance = 2 ** -40 * float(expected.abs().max())
            assert torch.allclose(seen['logits64'], expected, rtol=0, atol=tolerance), (repo, seen['logits64'], expected)
            assert torch.allclose(seen['logits'].double(), expected, rtol=0, atol=2 ** -16 * float(expected.abs().max())
                                  ), (repo, seen['logits'], expected)  # float32: 2**8 ulps of the largest logit
    finally:
        hub.close()


def _trained_student(out: Path, student: str, kwargs: dict) -> torch.nn.Module:
    """The student rebuilt from the run's final training checkpoint (not from its export or the Hub)."""
    ckpt = sorted((out / 'checkpoints').glob('step_*'))[-1]
    state = {k[len('student.'):]: v for k, v in load_file(str(ckpt / 'model.safetensors')).items()
             if k.startswith('student.')}
    config = yaml.safe_load((out / 'config.yaml').read_text())
    assert config['student'] == student
    model = vitkd.create_student(student, 8, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()
