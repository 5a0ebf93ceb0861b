"""A real `ray start --head` on 127.0.0.1 and `ray job submit` of examples/ray_job.sh."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of our own, stopped through the pid we started: `ray stop` would stop every
    Ray process on the machine, other people's clusters included."""
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp = Path("/tmp") / f"edr-{os.getpid()}"
    dash = free_port()
    # `python` in the job's entrypoint must be this environment's, as for a user whose venv is
    # active when they run `ray start`.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=path)
    start = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    # --block keeps `ray start` in the foreground as the parent of the node's processes; its own
    # session makes them one process group, which is what the teardown signals
    proc = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "ray start --head exited"
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the head's job server never answered"
                time.sleep(1)
        yield address, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # our group only: the pid this fixture started
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


def test_the_ray_job_example_prunes_your_own_model_on_the_cluster(head, tmp_path):
    """examples/ray_job.sh as a user runs it: `ray job submit --working-dir .` uploads the
    repository, and the job imports the model and data set by path (examples.user_model)."""
    address, env = head
    out = tmp_path / "job-run"
    cmd = ["bash", str(ROOT / "examples" / "ray_job.sh"), "--set", "epochs=1",
           "--set", "trainer_cpus=1", "--out", str(out), "--quiet"]  # fmt: skip
    env = dict(env, RAY_ADDRESS=address, EDROP_RAY_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted", proc.stdout + proc.stderr).group(1)
    assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
    for name in ("config.yaml", "report.json", "history.parquet", "population.parquet",
                 "mask.pt", "pruned_model.pt", "plots/energy.png"):  # fmt: skip
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ray" and report["model"] == "examples.user_model:make"
    assert report["params_pruned"] < report["params_dense"]
