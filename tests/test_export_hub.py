"""The exported student (timm format), --eval-student, and pushing to the Hub against a local Hub-API server.

One tiny training run (VkD student, random regnety_002 teacher, the VkD loss with its projector, EMA) pushes itself
with ``--push-to-hub`` to a small HTTP server on 127.0.0.1 that speaks the endpoints huggingface_hub 2.4 calls;
the tests then load what was exported / uploaded with plain timm in fresh processes and compare logits with a
student rebuilt independently from the training checkpoint.
"""
import base64
import hashlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import vitkd
from test_dense_multiprocess import scene_sets  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
TOKEN = 'hf_vitkdTestSecret0123456789abcdef'
KWARGS = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- a minimal Hub -------------------------------------------------------------------------------------------------

class FakeHub:
    """The Hub API endpoints huggingface_hub uses to create a repo, commit files and download them.

    Repos named ``*fail-once*`` refuse their first commit with 403 (to test the retry path). ``whoami`` accepts the
    test's token only. ``faults`` maps a regular expression of request paths to what a failing Hub does with them:
    ``500`` (an Internal Server Error answer), ``hang`` (no answer until the client gives up; at most
    ``HANG_S`` s) or ``drop`` (the connection closed without an answer).
    """

    HANG_S = 20

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.authorization: list[str] = []
        self.unknown: list[str] = []
        self.failed: set[str] = set()
        self.created: dict[str, dict] = {}
        self.faults: dict[str, str] = {}
        self.faulted: list[str] = []
        self.read_only = False  # whoami: the token may only read
        self.released = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body=b'', headers=None, content_type='application/json'):
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
                self.send_response(code)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def _faulted(self) -> bool:
                mode = next((m for pattern, m in hub.faults.items() if re.search(pattern, self.path)), None)
                if mode is None:
                    return False
                hub.faulted.append(f'{mode} {self.command} {self.path}')
                if mode == '500':
                    self._reply(500, {'error': 'Internal Error'})
                    return True
                if mode == 'hang':
                    hub.released.wait(hub.HANG_S)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                self.wfile = io.BytesIO()  # nothing more reaches the client
                return True

            def do_POST(self):
                if self._faulted():
                    return
                hub.authorization.append(self.headers.get('Authorization', ''))
                body = self._body()
                if self.path == '/api/repos/create':
                    req = json.loads(body)
                    repo = f'{req.get("organization") or "alice"}/{req["name"]}'
                    hub.repos.setdefault(repo, {})
                    hub.created[repo] = req
                    return self._reply(200, {'url': f'{hub.url}/{repo}', 'name': repo})
                if self.path == '/api/validate-yaml':
                    return self._reply(200, {'errors': [], 'warnings': []})
                m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(preupload|commit)/(\w+)', self.path)
                if m and m.group(2) == 'preupload':
                    files = json.loads(body)['files']
                    return self._reply(200, {'files': [{'path': f['path'], 'uploadMode': 'regular',
                                                        'shouldIgnore': False} for f in files]})
                if m:
                    repo = m.group(1)
                    if 'fail-once' in repo and repo not in hub.failed:
                        hub.failed.add(repo)
                        return self._reply(403, {'error': 'You have no write access to this repo'},
                                           headers={'X-Error-Message': 'You have no write access to this repo'})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item['key'] == 'file':
                            hub.repos[repo][item['value']['path']] = base64.b64decode(item['value']['content'])
                    sha = hashlib.sha1(body).hexdigest()
                    hub.commits[repo] = sha
                    return self._reply(200, {'commitUrl': f'{hub.url}/{repo}/commit/{sha}', 'commitOid': sha,
                                             'pullRequestUrl': None})
                hub.unknown.append(f'POST {self.path}')
                return self._reply(404, {'error': 'unknown endpoint'})

            def _resolve(self):
                if self._faulted():
                    return
                m = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', self.path.split('?')[0])
                repo = m and m.group(1)
                if not m or repo not in hub.repos:
                    hub.unknown.append(f'{self.command} {self.path}')
                    return self._reply(404, {'error': 'Repository not found'}, headers={'X-Error-Code': 'RepoNotFound'})
                data = hub.repos[repo].get(m.group(3))
                if data is None:
                    return self._reply(404, {'error': 'Entry not found'}, headers={'X-Error-Code': 'EntryNotFound'})
                return self._reply(200, data, content_type='application/octet-stream',
                                   headers={'X-Repo-Commit': hub.commits[repo],
                                            'ETag': f'"{hashlib.sha256(data).hexdigest()}"'})

            def do_GET(self):
                if self.path.split('?')[0] == '/api/whoami-v2':  # the token check of --push-to-hub
                    if self._faulted():
                        return
                    if self.headers.get('Authorization') != f'Bearer {TOKEN}':
                        return self._reply(401, {'error': 'Invalid credentials in Authorization header'})
                    return self._reply(200, {'type': 'user', 'name': 'alice', 'auth': {
                        'accessToken': {'role': 'read' if hub.read_only else 'write'}}})
                return self._resolve()

            do_HEAD = _resolve

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


# ---- fixtures ------------------------------------------------------------------------------------------------------

def make_image_folder(root: Path, classes: int = 8, train_per_class: int = 8, val_per_class: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n - (split == 'val' and c == classes - 1)):  # 15 val images: an odd count
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 30 * (c + 1)
                Image.fromarray(np.clip(base + rng.integers(0, 80, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    folder / f'{i}.png')
    return root


def hub_env(hub: FakeHub, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    return dict(env, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET='1',
                HF_HUB_DISABLE_TELEMETRY='1', PYTHONPATH=str(REPO), OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope='module')
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope='module')
def trained(hub, tmp_path_factory):
    """One epoch of a tiny VkD run with EMA, pushed to the fake Hub by ``--push-to-hub``."""
    base = tmp_path_factory.mktemp('export')
    data = make_image_folder(base / 'tinyfolder')
    out = base / 'run'
    args = ['main.py', '--data-path', str(data), '--input-size', '32', '--student', 'deit_ti_distilled',
            '--student-kwargs', *[f'{k}={v}' for k, v in KWARGS.items()], '--teacher', 'regnety_002',
            '--no-teacher-pretrained', '--distill', 'vkd', '--epochs', '1', '--batch-size', '8', '--num-workers', '0',
            '--lr', '1e-3', '--unscale-lr', '--model-ema', '--model-ema-decay', '0.9', '--output-dir', str(out),
            '--push-to-hub', '--hub-model-id', 'org/from-main']
    result = run(args, hub_env(hub, base / 'hf_home'))
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(out=out, data=data, result=result, base=base)


def reference_student(out: Path, ema: bool = False) -> torch.nn.Module:
    """The student rebuilt from the final training checkpoint with plain load_state_dict (not via the export)."""
    ckpt = sorted((out / 'checkpoints').glob('step_*'))[-1]
    if ema:
        state = {k[len('module.'):]: v for k, v in load_file(str(ckpt / 'ema.safetensors')).items()}
    else:
        state = {k[len('student.'):]: v for k, v in load_file(str(ckpt / 'model.safetensors')).items()
                 if k.startswith('student.')}
    model = vitkd.create_student('deit_ti_distilled', 8, **KWARGS)
    model.load_state_dict(state, strict=True)
    return model.eval()


def probe_input() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# ---- export ------------------------------------------------------------------------------------------------------

def test_export_is_the_student_alone_with_its_preprocessing(trained):
    out = trained['out']
    config = json.loads((out / 'student' / 'config.json').read_text())
    assert config['architecture'] == 'deit_ti_distilled' and config['num_classes'] == 8
    assert {k: config['model_args'][k] for k in KWARGS if k != 'img_size'} == {k: v for k, v in KWARGS.items()
                                                                               if k != 'img_size'}
    assert tuple(config['model_args']['img_size']) in ((32, 32), 32)
    pcfg = config['pretrained_cfg']
    assert tuple(pcfg['input_size']) == (3, 32, 32) and pcfg['crop_pct'] == 0.875 and pcfg['interpolation'] == 'bicubic'
    assert np.allclose(pcfg['mean'], IMAGENET_MEAN) and np.allclose(pcfg['std'], IMAGENET_STD)

    ckpt = sorted((out / 'checkpoints').glob('step_*'))[-1]
    training = load_file(str(ckpt / 'model.safetensors'))
    assert any(k.startswith('losses.vkd.projector') for k in training)  # the distillation part exists in training
    exported = load_file(str(out / 'student' / 'model.safetensors'))
    student_part = {k[len('student.'):]: v for k, v in training.items() if k.startswith('student.')}
    assert exported.keys() == student_part.keys()                        # ... and nothing else is exported
    assert all(torch.equal(exported[k], student_part[k]) for k in exported)
    ema = load_file(str(out / 'student_ema' / 'model.safetensors'))
    ema_ckpt = {k[len('module.'):]: v for k, v in load_file(str(ckpt / 'ema.safetensors')).items()}
    assert ema.keys() == exported.keys() and all(torch.equal(ema[k], ema_ckpt[k]) for k in ema)
    assert any(not torch.equal(ema[k], exported[k]) for k in ema)       # EMA weights, not a second copy


LOADER = r'''
import json, sys
import timm, torch
from safetensors.torch import save_file
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
jobs, out = json.loads(sys.argv[1]), {}
for name, spec, needs_vitkd in jobs:
    if needs_vitkd:
        import vitkd  # registers the VkD student
    else:
        assert 'vitkd' not in sys.modules
    model = timm.create_model(spec, pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)
    print(name, json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}))
    with torch.no_grad():
        out[name] = model(x).contiguous()
save_file(out, sys.argv[2])
'''


def test_timm_loads_the_exports_with_identical_logits(trained, hub, tmp_path):
    """A plain timm student loads with timm alone; the VkD student after ``import vitkd``; logits are identical."""
    from vitkd.export import export_model
    torch.manual_seed(0)
    timm_student = vitkd.create_student('deit_tiny_distilled_patch16_224', 8, img_size=32, patch_size=8, depth=2,
                                        embed_dim=48, num_heads=2).eval()
    data_config = dict(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=1.0,
                       interpolation='bilinear')
    export_model(timm_student, tmp_path / 'timm_student', data_config)
    jobs = [('timm', f'local-dir:{tmp_path / "timm_student"}', False),
            ('vkd', f'local-dir:{trained["out"] / "student"}', True),
            ('vkd_ema', f'local-dir:{trained["out"] / "student_ema"}', True)]
    result = run(['-c', LOADER, json.dumps(jobs), str(tmp_path / 'logits.safetensors')], hub_env(hub, tmp_path / 'h'))
    assert result.returncode == 0, result.stderr[-3000:]
    logits = load_file(str(tmp_path / 'logits.safetensors'))
    x = probe_input()
    with torch.no_grad():
        expected = {'timm': timm_student(x), 'vkd': reference_student(trained['out'])(x),
                    'vkd_ema': reference_student(trained['out'], ema=True)(x)}
    for name, value in expected.items():
        assert logits[name].shape == (4, 8) and torch.equal(logits[name], value), name
    seen = dict(line.split(' ', 1) for line in result.stdout.splitlines())
    timm_cfg = json.loads(seen['timm'])  # the recorded preprocessing is what timm resolves
    assert timm_cfg['mean'] == [0.5, 0.4, 0.3] and timm_cfg['std'] == [0.2, 0.25, 0.3]
    assert timm_cfg['input_size'] == [3, 32, 32] and timm_cfg['crop_pct'] == 1.0
    assert timm_cfg['interpolation'] == 'bilinear'


# ---- push ----------------------------------------------------------------------------------------------------------

def _no_token_anywhere(result, run_dir: Path):
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for path in run_dir.rglob('*'):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_from_main_uploads_a_model_card_and_timm_downloads_it_back(trained, hub, tmp_path):
    out = trained['out']
    files = hub.repos['org/from-main']
    assert set(files) == {'config.json', 'model.safetensors', 'README.md'}
    assert files['model.safetensors'] == (out / 'student' / 'model.safetensors').read_bytes()
    assert hub.authorization and all(a == f'Bearer {TOKEN}' for a in hub.authorization)
    assert hub.created['org/from-main'].get('visibility') != 'private'  # --hub-private not given
    assert not hub.unknown, hub.unknown
    _no_token_anywhere(trained['result'], out)
    assert 'pushed the student to' in trained['result'].stdout

    card = files['README.md'].decode()
    _, front, body = card.split('---\n', 2)
    meta = yaml.safe_load(front)
    assert meta['library_name'] == 'timm' and 'license' not in meta  # no --hub-license: none claimed
    assert 'License: none given' in body
    assert {'knowledge-distillation', 'vkd', 'image-classification'} <= set(meta['tags'])
    assert meta['datasets'] == ['tinyfolder']
    summary = json.loads((out / 'summary.json').read_text())
    for head in ('cls', 'dist', 'avg'):
        s = summary['student']
        assert f'| student | {head} | {s[f"{head}_top1"]:.2f} | {s[f"{head}_top5"]:.2f} |' in body
        assert f'| student (EMA) | {head} | {s[f"ema_{head}_top1"]:.2f} |' in body
    t = summary['teacher']
    assert f'| teacher | — | {t["teacher_top1"]:.2f} | {t["teacher_top5"]:.2f} |' in body
    assert '`deit_ti_distilled`' in body and '`regnety_002`' in body and '| vkd | 1 |' in body
    assert 'optimizer adamw, lr 0.001 (unscaled)' in body
    assert "timm.create_model('hf-hub:org/from-main', pretrained=True)" in body and 'import vitkd' in body

    download = LOADER.replace("assert 'vitkd' not in sys.modules", 'pass')
    jobs = [('hub', 'hf-hub:org/from-main', True)]
    result = run(['-c', download, json.dumps(jobs), str(tmp_path / 'logits.safetensors')],
                 hub_env(hub, tmp_path / 'fresh_hf_home'))
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = reference_student(out)(probe_input())
    assert torch.equal(load_file(str(tmp_path / 'logits.safetensors'))['hub'], expected)


def test_failed_push_keeps_the_export_and_its_retry_command_works(trained, hub, tmp_path):
    out = trained['out']
    before = {p.name: p.read_bytes() for p in (out / 'student').iterdir() if p.name != 'README.md'}
    env = hub_env(hub, tmp_path / 'h')
    result = run(['scripts/push_to_hub.py', str(out), '--hub-model-id', 'org/fail-once', '--hub-private'], env)
    assert result.returncode == 4, result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert len(line) == 1 and 'org/fail-once' in line[0] and 'export is intact' in line[0], result.stderr
    after = {p.name: p.read_bytes() for p in (out / 'student').iterdir() if p.name != 'README.md'}
    assert after == before
    assert 'model.safetensors' not in hub.repos['org/fail-once']
    _no_token_anywhere(result, out)

    retry = shlex.split(line[0].split('retry with: ', 1)[1])
    assert retry[:2] == ['python', 'scripts/push_to_hub.py'] and '--hub-private' in retry
    assert hub.created['org/fail-once'].get('visibility') == 'private'
    result = run(retry[1:], env)
    assert result.returncode == 0, result.stderr
    assert hub.repos['org/fail-once']['model.safetensors'] == before['model.safetensors']
    assert "hf-hub:org/fail-once'" in hub.repos['org/fail-once']['README.md'].decode()
    _no_token_anywhere(result, out)


# ---- --eval-student ----------------------------------------------------------------------------------------------

def hand_metrics(model: torch.nn.Module, data: Path) -> dict:
    """Top-1/top-5 per head counted sample by sample, with a torchvision pipeline written out by hand."""
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # timm eval at crop 0.875: floor(32 / 0.875) = 36
    classes = sorted(p.name for p in (data / 'val').iterdir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((data / 'val' / name).iterdir()):
            images.append(tf(Image.open(f).convert('RGB')))
            labels.append(c)
    with torch.no_grad():
        tokens = model.forward_features(torch.stack(images))
        heads = {'cls': model.head(tokens[:, 0]), 'dist': model.head_dist(tokens[:, 1])}
    heads['avg'] = (heads['cls'] + heads['dist']) / 2
    result = {}
    for head, logits in heads.items():
        for k in (1, 5):
            hits = 0
            for row, label in zip(logits.tolist(), labels):
                rank = sum(1 for v in row if v > row[label])
                hits += rank < k
            result[f'{head}_top{k}'] = 100.0 * hits / len(labels)
    return result


def _seed_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    snapshot = cache / f'models--{repo.replace("/", "--")}' / 'snapshots' / ('a' * 40)
    snapshot.mkdir(parents=True)
    for name in ('config.json', 'model.safetensors'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (cache / f'models--{repo.replace("/", "--")}' / 'refs').mkdir()
    (cache / f'models--{repo.replace("/", "--")}' / 'refs' / 'main').write_text('a' * 40)


def test_eval_student_from_every_source_matches_a_hand_count(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants

    import main
    out, data = trained['out'], trained['data']
    expected = hand_metrics(reference_student(out), data)
    final = json.loads((out / 'summary.json').read_text())['student']  # the run's own last evaluation
    assert all(final[k] == pytest.approx(v, abs=5.01e-4) for k, v in expected.items())  # summary: 3 decimals
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    _seed_hub_cache(tmp_path / 'cache', 'org/cached', out / 'student')
    ckpt = sorted((out / 'checkpoints').glob('step_*'))[-1]
    arch = ['--student', 'deit_ti_distilled', '--student-kwargs', *[f'{k}={v}' for k, v in KWARGS.items()],
            '--input-size', '32']
    sources = {'export': [str(out / 'student')], 'checkpoint': [str(ckpt)], 'run': [str(out)],
               'file': [str(ckpt / 'model.safetensors'), *arch], 'hub': ['hf-hub:org/cached']}
    for name, (spec, *extra) in sources.items():
        code = main.main(['--eval-student', '--student-ckpt', spec, *extra, '--data-path', str(data),
                          '--output-dir', str(tmp_path / name), '--num-workers', '0'])
        assert code == 0, name
        report = json.loads((tmp_path / name / 'eval_student.json').read_text())
        assert report['metrics']['samples'] == 15, name
        for key, value in expected.items():
            assert report['metrics'][key] == pytest.approx(value, abs=1e-4), (name, key)


def test_eval_student_strict_loading_is_one_line_listing_the_keys(trained, tmp_path, capsys):
    import main
    weights = load_file(str(trained['out'] / 'student' / 'model.safetensors'))
    del weights['head_dist.weight']
    weights['projector.weight'] = torch.zeros(2, 2)
    save_file(weights, str(tmp_path / 'bad.safetensors'))
    code = main.main(['--eval-student', '--student-ckpt', str(tmp_path / 'bad.safetensors'), '--student',
                      'deit_ti_distilled', '--student-kwargs', *[f'{k}={v}' for k, v in KWARGS.items()],
                      '--input-size', '32', '--data-path', str(trained['data']), '--output-dir', str(tmp_path / 'o')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert 'missing keys: head_dist.weight' in err[0] and 'unexpected keys: projector.weight' in err[0]
    assert not (tmp_path / 'o' / 'eval_student.json').exists()


def test_eval_student_on_two_processes_counts_each_sample_once(trained, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU='1', HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO), OMP_WAIT_POLICY='PASSIVE')
    cmd = ['-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0', 'main.py',
           '--eval-student', '--student-ckpt', str(trained['out'] / 'student'), '--data-path', str(trained['data']),
           '--batch-size', '4', '--num-workers', '0', '--output-dir', str(tmp_path / 'two')]
    result = run(cmd, env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / 'two' / 'eval_student.json').read_text())
    assert report['processes'] == 2 and report['metrics']['samples'] == 15  # 15 = 2 × 6 + 3: padded batches dropped
    expected = hand_metrics(reference_student(trained['out']), trained['data'])
    for key, value in expected.items():
        assert report['metrics'][key] == pytest.approx(value, abs=1e-4), key


# ---- a dense run: the whole detector / segmenter on the Hub -----------------------------------------------------

DENSE_TINY = ['--input-size', '64', '--pyramid-strides', '4', '8', '16', '--student-kwargs', 'patch_size=8',
              'depth=1', 'embed_dim=48', 'num_heads=3', '--batch-size', '8', '--num-workers', '0', '--epochs', '1',
              '--warmup-epochs', '0', '--pyramid-channels', '32', '--max-steps', '2', '--teacher',
              'vitkd_dense_segmenter', '--no-teacher-pretrained', '--teacher-kwargs', 'backbone=test_resnet',
              'img_size=64', 'strides=[4, 8, 16]', 'pyramid_channels=32']


def _python_block(card: str) -> str:
    return re.search(r'```python\n(.*?)```', card, re.S).group(1)


def test_dense_push_uploads_the_whole_segmenter_its_card_runs_and_eval_student_reads_it_back(hub, scene_sets,
                                                                                              tmp_path):
    """``--task segment --push-to-hub`` (a segmentation folder of 24 + 4 embedded scenes): the card's own snippet,
    run in a fresh process against the Hub, gives the logits of a segmenter rebuilt independently (its constructor +
    the training checkpoint's ``student.*`` weights); ``--eval-student hf-hub:…`` gives the run's own validation
    numbers."""
    out, repo, data = tmp_path / 'seg', 'org/dense-seg', str(scene_sets['segment'])
    env = hub_env(hub, tmp_path / 'hf_home')
    result = run(['main.py', '--task', 'segment', '--data-path', data, '--distill', 'vkd', 'kd:0.5', *DENSE_TINY,
                  '--output-dir', str(out), '--push-to-hub', '--hub-model-id', repo], env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.repos[repo]
    assert set(files) == {'config.json', 'model.safetensors', 'README.md'}
    assert files['model.safetensors'] == (out / 'student' / 'model.safetensors').read_bytes()
    card = files['README.md'].decode()
    meta = yaml.safe_load(card.split('---\n', 2)[1])
    assert meta['pipeline_tag'] == 'image-segmentation' and {'vkd', 'kd'} <= set(meta['tags'])
    summary = json.loads((out / 'summary.json').read_text())['student']
    assert f'| student | {summary["mIoU"]:.2f} | {summary["pixel_acc"]:.2f} |' in card
    assert 'The whole segmenter (backbone, feature pyramid and head)' in card
    assert 'horizontal flip' in card and 'RandAugment' not in card

    saving = ('from safetensors.torch import save_file\n'
              'save_file({"logits": logits.contiguous(), "x": ((image - mean) / std).contiguous()}, OUT)\n')
    snippet = 'torch_seed = __import__("torch").manual_seed(0)\n' + _python_block(card) + '\n' + saving
    saved = tmp_path / 'card.safetensors'
    ran = run(['-c', snippet.replace('OUT', repr(str(saved)))],
              dict(hub_env(hub, tmp_path / 'fresh_hf_home'), OMP_NUM_THREADS='1'))
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = load_file(str(saved))
    config = json.loads((out / 'student' / 'config.json').read_text())
    reference = timm.create_model(config['architecture'], **config['model_args'])
    ckpt = sorted((out / 'checkpoints').glob('step_*'))[-1]
    state = {k[len('student.'):]: v for k, v in load_file(str(ckpt / 'model.safetensors')).items()
             if k.startswith('student.')}
    reference.load_state_dict(state, strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels on both sides, one thread each: the same float32 sums
    try:
        with torch.no_grad():
            expected = reference.eval()(got['x'])
    finally:
        torch.set_num_threads(threads)
    assert got['logits'].shape == (1, 11, 64, 64) and torch.equal(got['logits'], expected)

    evaluated = run(['main.py', '--task', 'segment', '--data-path', data, '--eval-student', '--student-ckpt',
                     f'hf-hub:{repo}', '--output-dir', str(tmp_path / 'eval'), '--num-workers', '0'],
                    hub_env(hub, tmp_path / 'h3'))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / 'eval' / 'eval_student.json').read_text())['metrics']
    epochs = [r for r in map(json.loads, (out / 'log.jsonl').read_text().splitlines()) if r['kind'] == 'epoch']
    assert metrics['mIoU'] == epochs[-1]['val_mIoU'] and metrics['pixel_acc'] == epochs[-1]['val_pixel_acc']
