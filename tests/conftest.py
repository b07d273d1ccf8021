"""Fixtures shared by test modules."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module (tiny models: thread start-up costs more than it saves)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_on_calls(monkeypatch):
    """`kill_on_calls(module, "name", {2, 6})`: `module.name` now stops the run on those calls (numbered from 1
    over the whole test), as a kill would: the exception is not an Exception, so no handler in the run sees it."""

    def install(module, name: str, at_calls: set[int]) -> None:
        real, calls = getattr(module, name), {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] in at_calls:
                raise KeyboardInterrupt(f"killed at call {calls['n']} of {name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    return install


@pytest.fixture
def launch():
    """`launch(args, processes=2)`: `python <args>` for one process, `python -m torch.distributed.run --standalone
    --nproc_per_node N <args>` (gloo on CPU) for more; one thread per process, no progress bars. A failed run fails
    the test with the tail of its stderr."""

    def run(args: list[str], processes: int = 2) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFALIGN_NO_PROGRESS": "1"}
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        proc = subprocess.run([sys.executable, *(launcher if processes > 1 else []), *args], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return run
