"""Several machines, played on this one: two ``scripts/launch_multinode.sh`` launches (``--num_machines 2``, machine
ranks 0 and 1, rendezvous at 127.0.0.1, one CPU process each) form one 2-process run.

The slow test trains, checkpoints every step, SIGKILLs both launches and resumes with ``--resume auto``: the exported
student must equal, bit for bit, the same 2-node run never interrupted, and one process at the doubled batch to the
float64 tolerance of ``tests/test_multiprocess.py`` (whose helpers and tiny ImageFolder it uses). Then ND's class centres with a node-local cache folder per node
(``VITKD_CACHE_DIR``): only the global main process writes the centre file, so node 1's folder stays empty. The fast
tests check the launch script's and the SLURM example's commands by their dry runs.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_kill_resume import complete_steps
from test_multiprocess import (_args, _env, assert_same_weights, image_folder, run_one_process,  # noqa: F401 (fixture)
                               step_records)

REPO = Path(__file__).resolve().parents[1]


def _dry(script: str, env: dict, *args: str) -> list[list[str]]:
    result = subprocess.run(['bash', str(REPO / 'scripts' / script), *args], capture_output=True, text=True,
                            env=dict(os.environ, DRY_RUN='1', **env), cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_launch_script_dry_run_gives_every_node_the_same_world_and_its_own_rank():
    cmds = [_dry('launch_multinode.sh', dict(MAIN_ADDR='10.1.2.3', NODE_RANK=str(r), NUM_NODES='3', PROCS_PER_NODE='4',
                                             MAIN_PORT='29999'), '--batch-size', '8')[0] for r in range(3)]
    for rank, cmd in enumerate(cmds):
        assert cmd[1:3] == ['launch', '--config_file'] and '--multi_gpu' in cmd
        assert (_flag(cmd, '--num_machines'), _flag(cmd, '--num_processes')) == ('3', '12')
        assert _flag(cmd, '--machine_rank') == str(rank)
        assert (_flag(cmd, '--main_process_ip'), _flag(cmd, '--main_process_port')) == ('10.1.2.3', '29999')
        assert cmd[cmd.index('main.py') + 1:] == ['--batch-size', '8']
    cpu = _dry('launch_multinode.sh', dict(MAIN_ADDR='127.0.0.1', NODE_RANK='1', PROCS_PER_NODE='1', CPU='1'))[0]
    assert cpu[0] == 'ACCELERATE_USE_CPU=1' and _flag(cpu, '--num_processes') == '2'
    assert _flag(cpu, '--mixed_precision') == 'no'


def test_launch_script_needs_the_main_address_and_the_node_rank():
    result = subprocess.run(['bash', str(REPO / 'scripts' / 'launch_multinode.sh')], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k not in ('MAIN_ADDR', 'NODE_RANK')}, cwd=REPO)
    assert result.returncode != 0 and 'MAIN_ADDR' in result.stderr


def test_slurm_example_dry_run_launches_each_node_with_resume_auto():
    cmds = _dry('slurm_multinode.sbatch', dict(SLURM_JOB_NODELIST='gpu[07-08]', SLURM_NNODES='2', SLURM_JOB_ID='123'),
                '--data-path', '/data/imagenet')
    assert len(cmds) == 2
    for rank, cmd in enumerate(cmds):
        assert _flag(cmd, '--machine_rank') == str(rank) and _flag(cmd, '--main_process_ip') == 'gpu07'
        assert _flag(cmd, '--num_processes') == '16' and _flag(cmd, '--main_process_port') == '20123'
        assert cmd[-4:] == ['--data-path', '/data/imagenet', '--resume', 'auto']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch_two_nodes(args: list[str], logs: Path, node_env=({}, {}), float64: bool = False) -> list[subprocess.Popen]:
    port, launch = str(_free_port()), len(list(logs.glob('launch*-node0.log')))
    procs = []
    for rank in (0, 1):
        env = dict(_env(float64=float64), MAIN_ADDR='127.0.0.1', NODE_RANK=str(rank), MAIN_PORT=port, NUM_NODES='2',
                   PROCS_PER_NODE='1', CPU='1', OMP_NUM_THREADS='1', ACCELERATE=str(Path(sys.executable).with_name(
                       'accelerate')), **node_env[rank])
        log = (logs / f'launch{launch}-node{rank}.log').open('w')
        procs.append(subprocess.Popen(['bash', str(REPO / 'scripts' / 'launch_multinode.sh'), *args], stdout=log,
                                      stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True))
    return procs


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torch's elastic agent starts its workers in new sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _wait(procs, timeout=300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.mark.slow
@pytest.mark.ci_once
def test_two_nodes_train_get_killed_resume_and_match_one_process(image_folder, tmp_path):
    """Killed and resumed = never killed, bit for bit; and 2 nodes = 1 process at the doubled batch (in float64)."""
    one = run_one_process(_args(image_folder, tmp_path / 'one', 16, '--distill', 'vkd'), float64=True)
    assert one.returncode == 0, one.stderr[-3000:]
    whole = tmp_path / 'whole'  # the same 2-node run, never interrupted
    assert _wait(_launch_two_nodes(_args(image_folder, whole, 8, '--distill', 'vkd'), tmp_path, float64=True)) == [0, 0]

    out = tmp_path / 'two'
    args = _args(image_folder, out, 8, '--distill', 'vkd', '--save-every-steps', '1', '--resume', 'auto')
    procs = _launch_two_nodes(args, tmp_path, float64=True)
    deadline = time.time() + 240
    while not complete_steps(out) or complete_steps(out)[-1] < 3:
        assert all(p.poll() is None for p in procs), 'a node ended before it could be killed: ' + ''.join(
            log.read_text()[-1500:] for log in tmp_path.glob('launch*.log'))
        assert time.time() < deadline
        time.sleep(0.05)
    for p in procs:  # the whole launch of each "machine": accelerate, torchrun and its worker (own session)
        for pid in [p.pid, *_descendants(p.pid)]:
            os.kill(pid, signal.SIGKILL)
    _wait(procs)
    killed_at = complete_steps(out)[-1]
    assert 3 <= killed_at < 8 and not (out / 'student').exists()

    codes = _wait(_launch_two_nodes(args, tmp_path, float64=True))
    text = (tmp_path / 'launch2-node0.log').read_text()
    assert codes == [0, 0], text[-3000:] + (tmp_path / 'launch2-node1.log').read_text()[-3000:]
    resumed = re.search(r'resumed from (\S+): epoch \d+, step (\d+)', text)
    assert 'global batch 16' in text and resumed and int(resumed.group(2)) == killed_at, text[-3000:]
    assert [r['step'] for r in step_records(out)][-1] == 8
    exported = [load_file(run / 'student' / 'model.safetensors') for run in (whole, out)]
    assert exported[0].keys() == exported[1].keys()
    for k in exported[0]:  # resuming restores the state exactly: no tolerance
        assert torch.equal(exported[1][k], exported[0][k]), k
    assert_same_weights(tmp_path / 'one', out)
    a = step_records(tmp_path / 'one')
    assert abs(a[-1]['loss'] - a[0]['loss']) > 1e-2  # it trained: the weights compared moved


@pytest.mark.slow
@pytest.mark.ci_once
def test_two_nodes_with_node_local_caches_write_nd_centres_once(image_folder, tmp_path):
    """Each "node" has its own VITKD_CACHE_DIR (a node-local disk): one centre file, written by the global main."""
    caches = [tmp_path / 'node0-cache', tmp_path / 'node1-cache']
    args = _args(image_folder, tmp_path / 'nd', 8, '--distill', 'nd', '--epochs', '1')
    codes = _wait(_launch_two_nodes(args, tmp_path, ({'VITKD_CACHE_DIR': str(caches[0])},
                                                     {'VITKD_CACHE_DIR': str(caches[1])})))
    assert codes == [0, 0], ''.join(log.read_text()[-2000:] for log in tmp_path.glob('launch*.log'))
    written = [sorted(p.name for p in c.rglob('centers-*')) if c.exists() else [] for c in caches]
    assert len(written[0]) == 2 and written[1] == []  # .safetensors + .json on node 0 only
