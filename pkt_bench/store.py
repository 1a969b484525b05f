"""The result store: one JSON record per cell, at `<root>/records/<key>.json`.

Records are written atomically (a unique temp file in the same folder, fsync, rename), so a reader never sees
a half-written record and a crash leaves the previous record, if any, untouched. Artifacts of a cell live in
`<root>/artifacts/<key>/`; folders that methods reuse across cells (extractions, teacher generations) in
`<root>/cache/`. A cell that failed, or whose process ended without writing its record, has its attempts in
`<root>/failures/<key>.json` (removed once its record is stored), so a report made later still names it.

Record schema (version `SCHEMA_VERSION`): key, cell (what defines it), task_version, metrics, primary_metric,
items (per-item outcomes), costs (examples seen, optimizer steps, ...), stages (wall time and peak memory),
references (student/teacher scores on the same items), artifact, environment (versions, hardware, git commit, and
the diff of a `-dirty` one), budget (as used), fine_tune (per fine-tuning run: its stats and per-step losses),
made_by (the command), created_at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError
from pkt_bench.spec import SCHEMA_VERSION

RESULTS = "<results>"
"""How a failure note writes the results folder's path (a note travels with the records to other machines)."""


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.cache_dir = self.root / "cache"

    def check_writable(self) -> None:
        """Stop before any cell runs when records cannot be written here: the root is a file, or a folder this
        process may not write (nothing is created by the check)."""
        import os

        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--results {str(self.root)!r} is a file, not a folder; give a folder for the records")
        written = [p for p in (self.root, self.records_dir, self.cache_dir, self.root / "artifacts",
                               self.root / "logs") if p.is_dir()]
        if not written:  # not made yet: its nearest existing parent must take it
            written = [next(p for p in self.root.resolve().parents if p.exists())]
        for folder in written:
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"results folder {str(self.root)!r} is not writable ({folder} is read-only); make "
                                f"it writable or pass another --results")

    def path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def artifact_dir(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def partial_artifact_dir(self, key: str) -> Path:
        """A new, empty folder unique to the caller, where a cell's artifact is built before `place_artifact`.

        Folders `artifacts/<key>.<random>.partial` left behind are from runs that were killed; nothing reads
        them, and they can be deleted when no run is going on.
        """
        parent = self.artifact_dir(key).parent
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f"{key}.", suffix=".partial"))

    def place_artifact(self, key: str, folder: Path) -> Path:
        """Rename a finished artifact folder to `artifacts/<key>`, replacing an older one; return the new path.

        If another process places the same cell's artifact at the same moment, one of the two stays: both were
        built from the same cell, and the folder is never seen half-written.
        """
        final = self.artifact_dir(key)
        if final.exists():
            stale = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{key}.", suffix=".old"))
            with contextlib.suppress(FileNotFoundError):
                final.rename(stale / key)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            folder.rename(final)
        except OSError:
            if not final.exists():
                raise
        return final

    def get(self, key: str, unreadable_ok: bool = False) -> dict[str, Any] | None:
        """The record of `key`, or None. An unreadable one (truncated, say) is a `UserError` naming the file,
        or None with `unreadable_ok` (a `--force` run then overwrites it)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            if unreadable_ok:
                return None
            raise UserError(f"record {path} is unreadable ({error}); rerun with --force to overwrite it, or delete "
                            f"the file") from None

    def put(self, record: dict[str, Any]) -> Path:
        assert record["schema_version"] == SCHEMA_VERSION and record["key"]
        target = _write_json(self.path(record["key"]), record)
        self.failure_path(record["key"]).unlink(missing_ok=True)  # the cell has its record now
        return target

    def failure_path(self, key: str) -> Path:
        return self.root / "failures" / f"{key}.json"

    def failure(self, key: str) -> dict[str, Any] | None:
        """The attempts of a cell without a record: {key, label, attempts: [{at, host, pid, error}]}, where an
        attempt whose error is None was started and never finished (running now, or its process died)."""
        path = self.failure_path(key)
        if not path.exists() or self.path(key).exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a failure note is advisory: unreadable, it names nothing

    def note_attempt(self, key: str, label: str, error: str | None = None) -> None:
        """Note that this process starts the cell (`error` None) or that its attempt failed with `error` (the
        attempt this process started, or a new one when it started none: a worker elsewhere ran it); in `error`
        the results folder's path reads `<results>`."""
        import socket
        from datetime import datetime, timezone

        if error is not None:  # this machine's path to the results folder is no part of the note
            error = error.replace(str(self.root.resolve()), RESULTS)
        note = self.failure(key) or {"key": key, "label": label, "attempts": []}
        attempts = note["attempts"]
        host, pid = socket.gethostname(), os.getpid()
        if error is not None and attempts and attempts[-1]["error"] is None and (attempts[-1]["host"],
                                                                                  attempts[-1]["pid"]) == (host, pid):
            attempts[-1]["error"] = error
        else:
            attempts.append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": host, "pid": pid,
                             "error": error})
        _write_json(self.failure_path(key), {**note, "label": label})

    def put_diff(self, diff: str) -> dict[str, str]:
        """Store the uncommitted changes a record was made with, once per content, as `diffs/<sha256>.diff`
        (atomic, like records); returns what the record says of it."""
        import hashlib

        digest = hashlib.sha256(diff.encode()).hexdigest()
        target = self.root / "diffs" / f"{digest[:20]}.diff"
        if not target.exists():
            _write_atomically(target, lambda handle: handle.write(diff))
        return {"sha256": digest, "file": target.relative_to(self.root).as_posix()}

    def records(self) -> Iterator[dict[str, Any]]:
        """Every readable record of a known schema; others are reported and skipped, never changed."""
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                print(f"pkt-bench: warning: skipping unreadable record {path}: {error}", file=sys.stderr)
                continue
            if record.get("schema_version") != SCHEMA_VERSION:
                print(f"pkt-bench: warning: skipping {path}: schema {record.get('schema_version')!r}, "
                      f"this pkt-bench reads {SCHEMA_VERSION}", file=sys.stderr)
                continue
            yield record


def failure_reason(note: dict[str, Any]) -> str | None:
    """What a report says of a cell without a record, from its attempts: None while a process on this machine is
    still running it."""
    import socket

    attempts = note["attempts"]
    last = attempts[-1]
    if last["error"] is None:
        if last["host"] == socket.gethostname() and _alive(last["pid"]):
            return None
        why = f"its process ended without a record (killed, or out of memory?) on {last['host']} at {last['at']}"
    else:
        why = last["error"]
    return f"failed, {len(attempts)} attempt{'s' * (len(attempts) > 1)}: {why}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(target: Path, data: dict[str, Any]) -> Path:
    return _write_atomically(target, lambda handle: json.dump(data, handle, indent=1, sort_keys=True))


def _write_atomically(target: Path, write: Callable[[Any], Any]) -> Path:
    """`write(handle)` into a unique temp file in `target`'s folder, fsync, rename to `target`: a reader never sees
    a half-written file, and a crash leaves the previous one, if any, untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
