"""Commands that some slow tests run in a fresh process (a benchmark script, the ``sap-fast bench``
command, the torchrun example), started as soon as the run knows its tests instead of when the
test comes up.

The suite runs on one core almost throughout (tiny tensors, one thread), so on a two-core
machine these processes run on the other one, one at a time in the order of their tests, while
the tests before them run here. A test then only collects the result: the same command, the
same exit status and output, asserted by the test exactly as if it had run the command itself.
Only the commands of the tests selected for this run are started (``-m "not slow"`` starts none);
one whose test comes up before it was started runs then, in the foreground.

In a test module::

    E2E = prestart.command("gpu-e2e", [sys.executable, SCRIPT, "--out", "{out}/e2e.json"])

    @pytest.mark.slow
    @pytest.mark.prestart("gpu-e2e")
    def test_e2e():
        run = E2E.result()    # a subprocess.CompletedProcess; run.out is the folder "{out}" was

``{out}`` in an argument is replaced by a fresh folder, which is also the working folder; the
command finds this checkout's ``sap_fast`` first on its ``PYTHONPATH``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from typing import Dict, List, Optional

from support import REPO_ROOT

TIMEOUT_S = 600
_stopping = threading.Event()


class Command:
    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None, timeout: float = TIMEOUT_S):
        self.name, self.argv, self.env, self.timeout = name, list(argv), env, timeout
        self.out: Optional[str] = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._process: Optional[subprocess.Popen] = None
        self._result: Optional[subprocess.CompletedProcess] = None
        self._error: Optional[BaseException] = None

    def _run(self, background: bool = False) -> None:
        """Runs the command once (whichever thread gets here first); later calls return at once.
        In the background it runs at a lower priority, so that the tests running meanwhile keep
        the cores they ask for (it takes what they leave idle)."""
        with self._lock:
            if self._done.is_set():
                return
            try:
                if _stopping.is_set():
                    raise RuntimeError(f"the run ended before {self.name!r} started")
                self.out = tempfile.mkdtemp(prefix=f"sap_fast-test-{self.name}-")
                argv = [a.replace("{out}", self.out) for a in self.argv]
                path = [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
                env.update(self.env or {})
                # its own process group: stopping it stops the processes it started too
                self._process = subprocess.Popen(argv, cwd=self.out, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
                if _stopping.is_set():  # the run ended while it was starting
                    _kill_group(self._process)
                if background and hasattr(os, "setpriority"):
                    try:  # before it starts processes of its own, which inherit the priority
                        os.setpriority(os.PRIO_PROCESS, self._process.pid, 10)
                    except OSError:
                        pass
                try:
                    stdout, stderr = self._process.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    _kill_group(self._process)
                    stdout, stderr = self._process.communicate()
                    stderr += f"\n[killed after {self.timeout:.0f} s]"
                self._result = subprocess.CompletedProcess(argv, self._process.returncode, stdout, stderr)
                self._result.out = self.out
            except BaseException as err:  # noqa: BLE001 - handed to the test that asks
                self._error = err
            finally:
                self._done.set()

    def result(self) -> subprocess.CompletedProcess:
        """The finished run (waiting for it, or running it now if it has not started)."""
        self._run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            _kill_group(process)
        if self.out is not None:
            shutil.rmtree(self.out, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # POSIX: the command and what it started
    except (AttributeError, ProcessLookupError, PermissionError):
        process.kill()


COMMANDS: Dict[str, Command] = {}
_runner: Optional[threading.Thread] = None


def command(name: str, argv: List[str], env: Optional[Dict[str, str]] = None, timeout: float = TIMEOUT_S) -> Command:
    if name in COMMANDS:
        raise ValueError(f"a prestarted command named {name!r} exists already")
    COMMANDS[name] = Command(name, argv, env, timeout)
    return COMMANDS[name]


def start(names: List[str]) -> None:
    """Runs the named commands one after another in a background thread, in this order."""
    global _runner
    queue = [COMMANDS[n] for n in names]
    if not queue:
        return

    def run_all():
        for cmd in queue:
            cmd._run(background=True)
    _runner = threading.Thread(target=run_all, name="prestart", daemon=True)
    _runner.start()


def stop_all() -> None:
    """At the end of the run: kill what still runs, start nothing more, remove the folders."""
    _stopping.set()
    for cmd in COMMANDS.values():
        cmd.stop()
