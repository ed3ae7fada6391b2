"""SIGKILLs during the final write of ``sap-fast correct`` (run by tests/cli/test_outputs.py).

    python final_write_kills.py SUMMARY.json RANDOM_KILLS SEED -- correct ARGS...

Runs ``sap-fast correct ARGS`` in this process up to its final write (``Outputs.commit``), then,
instead of writing, forks children that each run the write and die by SIGKILL part-way:

* one child per filesystem step of the write (every ``os.open``, ``fsync``, ``chmod``, ``link``,
  ``symlink``, ``rename``, ``replace``, ``unlink``, ``rmdir``, ``mkdir`` and the folder
  exchange), killed just before that step: every point of the write, in order (a file's bytes
  are written between its ``open`` and its ``fsync``);
* ``RANDOM_KILLS`` children killed by this process after a random delay within the write's
  duration (seeded by ``SEED``), wherever they are, inside a system call included.

After each kill it records the state of ``--out`` (every file's bytes, hashed) and what was left
beside it, then puts the earlier folder back when the kill came after the swap. The last kill
comes just before the swap (the new folder complete beside ``--out``), and this process then
exits without writing: the test runs the command again. SUMMARY.json gets the states seen and
how often.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # no thread pool behind the forks

from sap_fast._runtime import io  # noqa: E402
from sap_fast.cli import main, outputs  # noqa: E402

STEPS = [(os, name) for name in ("open", "fsync", "chmod", "link", "symlink", "rename", "replace", "unlink",
                                 "rmdir", "mkdir")] + [(io, "exchange_folders")]


def snapshot(folder):
    """Relative path → sha256 of every file under ``folder`` (None if it is missing)."""
    if not os.path.isdir(folder):
        return None
    state = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


def leftovers(out):
    parent, name = os.path.split(out)
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


def child(commit, outs, kill_at=None):
    """In a forked child: the write, killed just before step ``kill_at`` (None: never)."""
    count = [0]

    swap = [None]

    def counted(module, name, real):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "exchange_folders":
                swap[0] = count[0]
            if name == "fsync":  # a point to be killed at, but no wait for the disk: a killed process
                return None      # loses nothing the kernel holds, and this is not a power cut
            return real(*args, **kwargs)
        setattr(module, name, step)

    for module, name in STEPS:
        counted(module, name, getattr(module, name))
    try:
        commit(outs)
    except BaseException:
        os._exit(3)
    os.write(1, f"{count[0]} {swap[0]}\n".encode())
    os._exit(0)


def fork(commit, outs, kill_at=None, delay=None):
    """Run the write in a child; returns (exit status or signal, stdout text)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 1)
        child(commit, outs, kill_at)
    os.close(write)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = b""
    while True:
        chunk = os.read(read, 1024)
        if not chunk:
            break
        text += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), text.decode()


def harness(summary_path, random_kills, seed):
    real = outputs.Outputs.commit

    def commit(outs):
        out = outs.folder
        old = snapshot(out)
        backup = out + "-backup"
        shutil.copytree(out, backup, symlinks=True)
        started = time.perf_counter()
        code, text = fork(real, outs)  # the whole write, uninterrupted: the new state and its step count
        seconds = time.perf_counter() - started
        assert code == 0, f"the uninterrupted write failed ({code})"
        steps, swap = map(int, text.split()[-2:])
        new = snapshot(out)
        assert new != old

        def restore():
            shutil.rmtree(out)
            shutil.copytree(backup, out, symlinks=True)

        restore()
        rng = random.Random(seed)
        plan = [("step", k, None) for k in range(1, steps + 1)]
        plan += [("time", None, rng.uniform(0, seconds)) for _ in range(random_kills)]
        plan.append(("step", swap, None))  # the last kill: the new folder complete beside --out, not yet swapped
        seen = {"old": 0, "new": 0}
        started = time.perf_counter()
        left = set()
        for kind, k, delay in plan:
            code, _ = fork(real, outs, kill_at=k, delay=delay)
            state = snapshot(out)
            if state == old:
                seen["old"] += 1
            elif state == new:
                seen["new"] += 1
                restore()
            else:
                raise AssertionError(f"kill ({kind} {k or delay}, exit {code}) left --out as neither the earlier "
                                     f"nor the new folder: {state}")
            left.update(e.split(".sap_fast-")[1].split("-")[0] for e in leftovers(out))
        shutil.rmtree(backup)
        with open(summary_path, "w", encoding="utf-8") as f:
            json.dump({"steps": steps, "swap_step": swap, "kills": len(plan), "seen": seen,
                       "left_beside": sorted(left), "write_seconds": seconds,
                       "kill_seconds": time.perf_counter() - started, "old": old, "new": new}, f)
        os._exit(0)  # the run stops here, as a killed one would

    outputs.Outputs.commit = commit
    sys.exit(main(sys.argv[sys.argv.index("--") + 1:]))


if __name__ == "__main__":
    harness(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
