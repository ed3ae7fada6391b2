"""Where ``sap-fast correct`` writes, and how: the output rules, in one place.

Checked by :meth:`Outputs.check` before anything is read or computed, every path resolved
(``os.path.realpath``: symbolic links followed) and compared with every input of the run:

* no output replaces an input file, and none lands in an input folder (an image folder, a
  Clothing1M root, a ``hf:`` model folder);
* an ``--out`` that already holds a result (any of :data:`RESULT_FILES`), or an existing
  ``--stats-out`` file, is refused unless ``--overwrite`` is given; the earlier result's files are
  then replaced, and every other file in ``--out`` is kept as it is;
* an existing ``--out`` is replaced as a whole folder (below), so it may hold files but no folder
  of its own (apart from the scoring checkpoint), and not the working folder.

Written by :meth:`Outputs.commit`, at the end: every result file goes into a staging folder
beside ``--out`` (on the same filesystem), the other files of an existing ``--out`` are linked
into it (hard links: the same files, not copies), and the staging folder then takes the place
of ``--out`` in one step: a rename for a new ``--out``, an atomic exchange of the two folders
for an existing one (Linux ``renameat2(RENAME_EXCHANGE)``). After a kill at any moment,
``--out`` is the complete earlier folder or the complete new one. Where the exchange is not
available, two renames do it, between which ``--out`` is absent (the earlier folder then waits
beside it, and the next run says so). Staging folders a killed run left beside ``--out`` are
removed by the next run that writes it. ``--stats-out`` outside ``--out`` is written beside its
destination and renamed into place right after the swap.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .._runtime import io

RESULT_FILES = ("corrected.safetensors", "corrected.pt", "trusted.pt", "report.json", "report.png")
PARTIAL = ".sap_fast-partial"   # the scoring checkpoint's folder inside --out
OURS = ".sap_fast-"             # the prefix of everything sap_fast keeps for itself (checkpoint, temporary files)
NEW, OLD = ".sap_fast-new-", ".sap_fast-old-"   # staging folders beside --out: .NAME.sap_fast-new-XXXX

__all__ = ["Outputs", "RESULT_FILES", "PARTIAL"]


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Outputs:
    """The outputs of one run: ``--out`` (``folder``), the optional ``--stats-out`` file, and
    whether ``--overwrite`` lets an earlier result be replaced.

    :meth:`check` applies the rules before the run starts; :meth:`add` registers a result file's
    writer, :meth:`add_stats` the statistics' writer, and :meth:`commit` writes them all and
    swaps them into place (module docstring).
    """

    def __init__(self, folder: str, *, stats_out: Optional[str] = None, overwrite: bool = False):
        self.given = folder
        self.folder = os.path.realpath(folder)
        self.parent, self.name = os.path.split(self.folder)
        self.partial = os.path.join(self.folder, PARTIAL)
        self.stats_given = stats_out
        self.stats_out = None if stats_out is None else os.path.realpath(stats_out)
        self.overwrite = overwrite
        self._writers: Dict[str, Callable[[str], None]] = {}
        self._stats_writer: Optional[Callable[[str], None]] = None

    # -- the rules -----------------------------------------------------------------------------
    @property
    def stats_inside(self) -> bool:
        """Whether ``--stats-out`` is a file of ``--out`` (then it is staged with the result)."""
        return self.stats_out is not None and os.path.dirname(self.stats_out) == self.folder

    def check(self, inputs: Iterable[Tuple[str, Optional[str]]], *, resume: bool = False) -> None:
        """Refuse, in one line, a run whose outputs would replace or land among its inputs or
        replace an earlier result without ``--overwrite``. ``inputs``: ``(flag, path)`` of every
        file or folder the run reads (None: not given)."""
        out, stats_out = self.folder, self.stats_out
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {self.given} is a file, not a folder; name a folder for the results")
        if stats_out is not None:
            if os.path.isdir(stats_out):
                raise ValueError(f"--stats-out {self.stats_given} is a folder; name the file to write")
            name = os.path.basename(stats_out)
            if self.stats_inside and (name in RESULT_FILES or name.startswith(OURS)):
                raise ValueError(f"--stats-out {self.stats_given} is a name sap-fast uses in --out itself (its "
                                 f"result files, {OURS}*); name the statistics otherwise, e.g. stats.pt")
            if _inside(stats_out, out) and not self.stats_inside:
                raise ValueError(f"--stats-out {self.stats_given} lies in a folder below --out {self.given}; "
                                 "put it in --out itself or outside it")
            if not self.stats_inside and not os.path.isdir(os.path.dirname(stats_out)):
                raise ValueError(f"--stats-out {self.stats_given}: the folder {os.path.dirname(stats_out)} "
                                 "does not exist; create it first")
        outputs = [("--out", self.given, out)] + ([] if stats_out is None else
                                                  [("--stats-out", self.stats_given, stats_out)])
        replaced = {os.path.join(out, name): "--out" for name in RESULT_FILES}
        if stats_out is not None:
            replaced[stats_out] = "--stats-out"
        for flag, path in inputs:
            if path is None or not os.path.exists(path):
                continue  # reading it will say what is wrong
            real = os.path.realpath(path)
            if os.path.isdir(real):
                for oflag, given, where in outputs:
                    if _inside(where, real):
                        how = "is" if where == real else "lies inside"
                        raise ValueError(f"{oflag} {given} {how} {flag} {path}: the results would be written "
                                         "among its files; choose a place outside it")
                if _inside(real, out):
                    raise ValueError(f"{flag} {path} lies inside --out {self.given}, which is replaced as one "
                                     "folder at the end; give --out a folder of its own")
            elif real in replaced:
                if replaced[real] == "--stats-out":
                    raise ValueError(f"--stats-out {self.stats_given} is {flag} {path}: writing the statistics "
                                     "would replace an input of this run; choose another file")
                raise ValueError(f"{flag} {path} is part of the result in --out {self.given}, which this run "
                                 "replaces; copy it elsewhere first, or choose another --out")
        if os.path.isdir(out):
            self._check_existing(resume)
        elif any(entry.startswith(f".{self.name}{OLD}") for entry in self._siblings()):
            old = next(e for e in self._siblings() if e.startswith(f".{self.name}{OLD}"))
            raise ValueError(f"--out {self.given} is missing: a run that was replacing it stopped halfway, and "
                             f"the earlier folder is {os.path.join(self.parent, old)}; rename it back to "
                             f"{self.given} (or remove it) and run again")
        if stats_out is not None and not self.stats_inside and os.path.isfile(stats_out) and not self.overwrite:
            raise ValueError(f"--stats-out {self.stats_given} already exists; pass --overwrite to replace it, "
                             "or choose another file")

    def _check_existing(self, resume: bool) -> None:
        out = self.folder
        entries = sorted(os.listdir(out))
        for entry in entries:
            path = os.path.join(out, entry)
            if entry == PARTIAL:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                raise ValueError(f"--out {self.given} holds the folder {entry!r}, which is not sap-fast's: "
                                 "the result replaces --out as one folder, so give it a folder of its own "
                                 "(a new one, or an earlier result's)")
            if not (os.path.islink(path) or os.path.isfile(path)):
                raise ValueError(f"--out {self.given} holds {entry!r}, which is neither a file nor a link; "
                                 "give --out a folder of its own")
        if _inside(os.path.realpath(os.getcwd()), out):
            raise ValueError(f"--out {self.given} holds the working folder, and it is replaced as one folder "
                             "at the end; run from another folder, or choose another --out")
        if os.path.isdir(self.partial) and not resume:
            raise ValueError(f"{self.given} holds an interrupted run's scores ({PARTIAL}); continue it with "
                             f"--resume, or remove {self.partial} to start over")
        found = [name for name in RESULT_FILES if name in entries]
        if self.stats_inside and os.path.basename(self.stats_out) in entries:
            found.append(os.path.basename(self.stats_out))
        if found and not self.overwrite:
            raise ValueError(f"--out {self.given} already holds a result ({', '.join(found)}); pass --overwrite "
                             "to replace it, or choose another --out")

    def _siblings(self) -> List[str]:
        try:
            return sorted(os.listdir(self.parent))
        except OSError:
            return []

    # -- writing -------------------------------------------------------------------------------
    def add(self, name: str, write: Callable[[str], None]) -> str:
        """Register ``write(path)`` for the result file ``name``; returns its final path."""
        self._writers[name] = write
        return os.path.join(self.folder, name)

    def add_stats(self, write: Callable[[str], None]) -> None:
        """Register ``write(path)`` for ``--stats-out``."""
        if self.stats_inside:
            self.add(os.path.basename(self.stats_out), write)
        else:
            self._stats_writer = write

    def commit(self) -> None:
        """Write every registered file and put them in place together (module docstring); on any
        error before the swap, nothing has changed."""
        os.makedirs(self.parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{self.name}{NEW}", dir=self.parent)
        stats_tmp = None
        try:
            for name, write in self._writers.items():
                write(os.path.join(staging, name))
            if self._stats_writer is not None:  # beside its destination, renamed after the swap
                stats_tmp = os.path.join(os.path.dirname(self.stats_out), f"{OURS}{secrets.token_hex(8)}.tmp")
                self._stats_writer(stats_tmp)
                if os.path.isfile(self.stats_out):  # replacing a file: keep its permissions
                    os.chmod(stats_tmp, stat.S_IMODE(os.stat(self.stats_out).st_mode))
            existing = os.path.isdir(self.folder)
            if existing:
                self._carry(staging)
            os.chmod(staging, stat.S_IMODE(os.stat(self.folder).st_mode) if existing
                     else 0o777 & ~io.current_umask())  # a folder as mkdir makes it, not mkdtemp's 0700
            io.fsync_folder(staging)
            old = self._swap(staging, existing)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if stats_tmp is not None:
                io.discard(stats_tmp)
            raise
        if stats_tmp is not None:
            os.replace(stats_tmp, self.stats_out)
            io.fsync_folder(os.path.dirname(self.stats_out))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for entry in self._siblings():  # what a killed run left beside --out
            if entry.startswith((f".{self.name}{NEW}", f".{self.name}{OLD}")):
                shutil.rmtree(os.path.join(self.parent, entry), ignore_errors=True)

    def _carry(self, staging: str) -> None:
        """Link every file of the existing ``--out`` that is not part of a result into ``staging``."""
        for entry in sorted(os.listdir(self.folder)):
            if entry in RESULT_FILES or entry in self._writers or entry.startswith(OURS):
                continue
            source, target = os.path.join(self.folder, entry), os.path.join(staging, entry)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
            elif os.path.isfile(source):
                try:
                    os.link(source, target)
                except OSError:  # a filesystem without hard links: a copy, with its times and mode
                    shutil.copy2(source, target)
            else:
                raise ValueError(f"--out {self.given} now holds {entry!r}, which is not a file; give --out "
                                 "a folder of its own")

    def _swap(self, staging: str, existing: bool) -> Optional[str]:
        """Put ``staging`` at ``--out`` in one step; returns where the earlier folder now is."""
        if not existing:
            os.rename(staging, self.folder)
            io.fsync_folder(self.parent)
            return None
        if io.exchange_folders(staging, self.folder):
            io.fsync_folder(self.parent)
            return staging  # the earlier folder, under the staging name
        old = tempfile.mkdtemp(prefix=f".{self.name}{OLD}", dir=self.parent)
        os.rmdir(old)  # a free name beside --out
        os.rename(self.folder, old)
        os.rename(staging, self.folder)
        io.fsync_folder(self.parent)
        return old

