"""What a launched run left behind, read by the ``flmnist`` command: whether it wrote a new
summary, what it says (finished, failed, refused by a setting the ServerApp checked), and the
output line after which the run is over."""

from __future__ import annotations

import json
from pathlib import Path

from flmnist.core.errors import ConfigError, RunFailed
from flmnist.core.run_files import file_stamp
from flmnist.observers.recorder import DEGRADED, FINAL_LINE


def wrote_summary(run_dir: Path, before: tuple[int, int] | None) -> bool:
    """Whether the run wrote a summary since the launch (``before``: the summary file's identity
    then; a resumed run may hold an old one)."""
    return file_stamp(run_dir / "summary.json") not in (None, before)


def config_error_in(log: Path, start: int = 0) -> str | None:
    """The last ConfigError the ServerApp raised, as its log shows it from byte ``start`` on, or None."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    marker = "flmnist.core.errors.ConfigError: "
    found = [line.split(marker, 1)[1].strip() for line in lines if marker in line]
    return found[-1] if found else None


def outcome(run_dir: Path, before: tuple[int, int] | None, code: int, log_from: int = 0) -> dict:
    """The run's summary if it finished; else RunFailed saying why and where the log is.

    ``before``, ``log_from``: the summary's identity and the log's size before the launch (a
    resumed run may hold an old summary, and appends to its earlier attempts' log)."""
    log = run_dir / "flwr_run.log"
    path = run_dir / "summary.json"
    if not wrote_summary(run_dir, before):
        refused = config_error_in(log, log_from)
        if refused:  # a setting the server found wrong before training (it needs the data or the fleet)
            raise ConfigError(refused)
        raise RunFailed(f"the run wrote no summary (flwr run exited with {code}); see {log}")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFailed(f"the run's summary {path} is unreadable ({err}); see {log}") from err
    status = summary.get("status") if isinstance(summary, dict) else None
    if status != "finished":
        error = summary.get("error") if isinstance(summary, dict) else None
        raise RunFailed(f"the run did not finish (status {status!r}{f': {error}' if error else ''}); see {log}")
    if code != 0:
        raise RunFailed(f"flwr run exited with {code} although the summary says finished; see {log}")
    return summary


def finished_line(run_dir: Path, before: tuple | None):
    """A test of each output line: True at the run's last line once it wrote a new summary saying
    it finished (the recorder writes ``summary.json`` last, then prints that line: ``Run
    finished:``, or ``Run finished degraded:``)."""
    last_lines = (FINAL_LINE.format(status="finished"), FINAL_LINE.format(status=DEGRADED))

    def test(line: str) -> bool:
        test.seen = test.seen or (any(last in line for last in last_lines) and wrote_summary(run_dir, before))
        return test.seen

    test.seen = False
    return test
