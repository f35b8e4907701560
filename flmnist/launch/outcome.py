"""What a launched run left behind, read by the ``flmnist`` command: whether it wrote a new
summary, what it says (finished, failed, refused by a setting the ServerApp checked), the
output line after which the run is over, and what the command says when stopped mid-run."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from flmnist.config.resume import run_summary
from flmnist.config.validate import collapse_args, run_length
from flmnist.core.errors import ConfigError, RunFailed
from flmnist.core.run_files import CHECKPOINT, file_stamp, resume_arg
from flmnist.launch.flwr_local import shielded
from flmnist.observers.recorder import DEGRADED, FINAL_LINE
from flmnist.observers.stopped import summarize_stopped

INTERRUPTED = "interrupted; every process this run started has been stopped"  # Ctrl-C


class Stop(BaseException):
    """Ends the command with ``code`` after ``message``. A BaseException, so that Hydra lets it
    through without printing a traceback of its own (as it does for KeyboardInterrupt)."""

    def __init__(self, message: str, code: int, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.cause = cause


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


def stopped(stop: BaseException, cfg: DictConfig, run_dir: Path, before: tuple | None) -> Stop:
    """The Stop that ends the command, whatever writing the stopped run's summary meets (a full
    disk: the signal still ends a sweep, with its exit code, instead of failing one job)."""
    try:
        message = stopped_message(stop, cfg, run_dir, before)
    except Exception as err:  # noqa: BLE001
        why = str(stop) if isinstance(stop, Stop) else INTERRUPTED
        message = f"{why}; its results so far could not be summarized ({type(err).__name__}: {err})"
    return Stop(message, getattr(stop, "code", 130))


def stopped_message(stop: BaseException, cfg: DictConfig, run_dir: Path, before: tuple | None) -> str:
    """What the command says when stopped mid-run (its processes already stopped): the summary of
    the results so far, written here unless the run wrote its own, and how to continue."""
    why = str(stop) if isinstance(stop, Stop) else INTERRUPTED
    own = run_summary(run_dir) if wrote_summary(run_dir, before) else {}  # a failure of its own is kept, not one
    status, error = own.get("status"), own.get("error")  # as Flower shut down under it
    if status == "finished" or (status == "failed" and "shutdown" not in str(error)):
        return f"{why}; the run had {status}{f': {error}' if error else ''}: results in {run_dir}"
    unit, steps = run_length(cfg)
    with shielded():  # a second Ctrl-C must not leave the run without its summary
        summary = summarize_stopped(run_dir, steps, cfg.target_accuracy, unit, why.split(";")[0], **collapse_args(cfg))
    if summary is None:
        return f"{why}; it had recorded no {unit} yet"
    more = (f"; continue it with: flmnist {resume_arg(run_dir)}" if (run_dir / CHECKPOINT).is_file() else "")
    return f"{why}; results after {unit} {summary['rounds_completed']} in {run_dir / 'summary.json'}{more}"
