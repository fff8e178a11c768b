"""Running sftkit train (or rlhf) in several processes (torchrun, gloo on CPU) from tests: on one node, or on several
simulated nodes of this machine (one `sftkit train` per node, as each node of a cluster would run it)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from sftkit.distributed import launch_command


def options(model_dir, data_file, output_dir, **extra):
    values = {"model": model_dir, "dataset": data_file, "template": "chatml", "max_steps": 4, "eval_steps": 2,
              "save_steps": 2, "logging_steps": 1, "learning_rate": 5e-3, "lora_dropout": 0.0, "dataset_test_ratio": 0.2,
              "output_dir": str(output_dir), "add_output_dir_suffix": False, "save_total_limit": 10}
    values.update(extra)
    return values


def torchrun(values: dict, nproc: int = 2, timeout: int = 300, command: str = "train", **env):
    command = launch_command({"NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(_free_port())}, _argv(values, command))
    result = _run(command, {**_env(), **env}, timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def stop_launched_run(values: dict, sent: int, timeout: int = 180) -> tuple[int, str, list[int]]:
    """Start `sftkit train` with NPROC_PER_NODE=2, send `sent` to it alone once its ranks are training, and wait:
    (its exit code, its output, the processes it started that are still alive)."""
    command = [sys.executable, "-m", "sftkit_cli.main", *_argv(values)]
    env = {**_env(), "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics, started = os.path.join(values["output_dir"], "metrics.jsonl"), time.monotonic()
    try:
        while not os.path.exists(metrics) and process.poll() is None and time.monotonic() - started < timeout:
            time.sleep(0.2)
        launched = _tree(process.pid)
        process.send_signal(sent)
        output, _ = process.communicate(timeout=timeout)
        time.sleep(1)
        return process.returncode, output, [pid for pid in launched[1:] if _alive(pid)]
    finally:
        _signal_tree(process.pid, signal.SIGKILL)
        process.wait()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to read its exit code."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def nodes(values: dict, count: int = 2, nproc_per_node: int = 1, timeout: int = 300, **env) -> list:
    """`sftkit train` started once per simulated node with ms-swift's variables (NNODES, NODE_RANK, MASTER_ADDR,
    MASTER_PORT), each relaunching itself under torchrun; returns every node's finished process."""
    launch = {"NNODES": str(count), "NPROC_PER_NODE": str(nproc_per_node), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port()), **env}
    command = [sys.executable, "-m", "sftkit_cli.main", *_argv(values)]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**_env(), **launch, "NODE_RANK": str(rank)}) for rank in range(count)]
    finished = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=timeout)
            finished.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    finally:
        for process in started:
            _signal_tree(process.pid, signal.SIGKILL)  # a node that failed leaves the others waiting for it
            process.wait()
    for result in finished:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return finished


def _run(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """The launcher's finished process; one that runs past the timeout has it and every process under it print their
    Python stacks (faulthandler on SIGABRT, one process at a time so the dumps do not interleave) and fails the test
    with the frames of those stacks, so a hang says where each process waits."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**env, "PYTHONFAULTHANDLER": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for member in _tree(process.pid):  # the launcher first: its workers live on to dump their own stacks
            _signal(member, signal.SIGABRT)
            time.sleep(1)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(no output after SIGABRT)"
        said = stderr.split("Fatal Python error")[0]  # what the processes printed before the dumps: an error?
        raise AssertionError(f"ran past {timeout} s: {' '.join(command)}\nlast output:\n{stdout[-1500:]}\n"
                             f"last errors before the stacks:\n{said[-1500:]}\nstacks (CI keeps a log's end):\n{stacks(stderr)}")
    finally:
        _signal_tree(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stacks(stderr: str, limit: int = 4000) -> str:
    """faulthandler's dumps in stderr, one short line per frame (path from the package root, line, function),
    without the launch frames every stack shares (runpy, click)."""
    kept = []
    for line in stderr.splitlines():
        frame = re.match(r'\s*File "(.*)", line (\d+) in (\S+)', line)
        if frame:
            path = frame.group(1)
            if "<frozen runpy>" not in path and "/click/" not in path:
                kept.append(f"  {re.sub(r'^.*/(site-packages|main)/', '', path)}:{frame.group(2)} {frame.group(3)}")
        elif line.startswith(("Fatal Python error", "Thread 0x", "Current thread")):
            kept.append(line)
    return "\n".join(kept)[-limit:]


def _tree(pid: int) -> list[int]:
    """A process and every process under it, parents before children (torchrun starts its workers in sessions of
    their own, so a process group does not reach them)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    tree, index = [pid], 0
    while index < len(tree):
        tree += parents.get(tree[index], [])
        index += 1
    return tree


def _signal_tree(pid: int, signum: int) -> None:
    for member in reversed(_tree(pid)):
        _signal(member, signum)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _argv(values: dict, command: str = "train") -> list[str]:
    return [command] + [item for key, value in values.items() for item in (f"--{key}", str(value))]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def assert_same_losses(run, reference, tolerance: float) -> None:
    """Two runs logged the same steps, with training and validation losses within the tolerance."""
    mine, theirs = records(run), records(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(mine, theirs):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < tolerance, (a, b)
