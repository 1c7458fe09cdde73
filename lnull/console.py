"""The console shows lnull's own lines and progress bars; library chatter goes to the run's log files.

``quiet_libraries()`` (the CLI calls it once, before any stage runs; library users of ``run_pipeline`` keep
Python's defaults) routes, with the logging and warnings machinery only:

- the loggers of the libraries lnull drives (``LIBRARY_LOGGERS``: lm_eval, transformers, datasets,
  huggingface_hub, accelerate, peft, torch, ...) and the root logger, which catches any other library's
  records, to one handler that writes into the stage log open now, ``<run>/logs/<stage>.log``
  (:func:`stage_log`; ``run_pipeline`` opens one per stage). With no stage log open (composing, ``lnull store``)
  their warnings and errors still reach stderr: nothing is lost outside a stage;
- Python warnings (``logging.captureWarnings``, logger ``py.warnings``): every one is written to the stage log;
  those raised by lnull's own code (``RankDeficientWarning`` re-raised by the init stage, export's logit
  check) are also printed on the console as Python prints them, those raised inside other packages
  (transformers' ``FutureWarning``\\ s, torch's ``UserWarning``\\ s) are not;
- the libraries' own progress bars off (transformers' weight loading, datasets, huggingface_hub downloads):
  lnull's bars (calibration batches, init layers, training steps, generation) stay, one per stage.

lm-eval's request progress bars are turned off where lnull builds its model (``lnull.evaluate.harness``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import IO, Iterator, Optional

LIBRARY_LOGGERS = ("lm_eval", "transformers", "datasets", "huggingface_hub", "accelerate", "peft", "torch",
                   "deepspeed", "DeepSpeed", "vllm", "filelock", "fsspec", "urllib3", "matplotlib", "PIL")
WARNINGS_LOGGER = "py.warnings"
FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


class StageLogHandler(logging.Handler):
    """Writes each record into the innermost open stage log; with none open, WARNING and above go to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.streams: list[IO[str]] = []
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.streams:
                self.streams[-1].write(self.format(record).rstrip("\n") + "\n")
                self.streams[-1].flush()
            elif record.levelno >= logging.WARNING:
                sys.stderr.write(record.getMessage().rstrip("\n") + "\n")
        except Exception:  # noqa: BLE001 (logging's contract: a handler never raises)
            self.handleError(record)


def raised_by_lnull() -> bool:
    """Whether the warning being handled now was raised by lnull's own code: the first frame below the warnings
    and logging machinery (the caller of ``warnings.warn``, whatever its ``stacklevel`` points at) is in an
    ``lnull`` module (this one excepted)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module not in ("logging", "warnings", __name__) and not module.startswith("logging."):
            return module == "lnull" or module.startswith("lnull.")
        frame = frame.f_back
    return False


class OwnWarnings(logging.Filter):
    """Passes a ``py.warnings`` record only when lnull's own code raised the warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return raised_by_lnull()


class Divert(logging.Filter):
    """On a library's logger: a record logged on it directly goes to the stage log and to none of the handlers
    the library attaches itself (DeepSpeed adds a stdout handler when it is imported, mid-stage)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _HANDLER is not None:
            _HANDLER.handle(record)
        return False


_HANDLER: Optional[StageLogHandler] = None
_DIVERT = Divert()


def quiet_libraries() -> StageLogHandler:
    """Route library chatter to the stage logs (module docstring); idempotent. Returns the handler."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = StageLogHandler()
        # before the libraries are imported: their progress bars start off
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.captureWarnings(True)
        py_warnings = logging.getLogger(WARNINGS_LOGGER)
        py_warnings.propagate = False
        py_warnings.addHandler(_HANDLER)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(OwnWarnings())
        py_warnings.addHandler(console)
        logging.getLogger().addHandler(_HANDLER)
    adopt_library_loggers()
    return _HANDLER


def adopt_library_loggers() -> None:
    """Point every library logger at the stage-log handler, dropping the console handlers the libraries add to
    themselves when imported (transformers, datasets, huggingface_hub, lm-eval's ``setup_logging``), and turn
    off the progress bars of the libraries imported by now. Cheap; called again when a stage starts, since a
    library may have been imported since (no-op before :func:`quiet_libraries`)."""
    if _HANDLER is None:
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler is not _HANDLER and type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        if _DIVERT not in logger.filters:
            logger.addFilter(_DIVERT)
        logger.propagate = False


def open_stage_log() -> Optional[Path]:
    """The stage log library chatter goes to now (None: the console is not quiet, or no stage log is open)."""
    if _HANDLER is None or not _HANDLER.streams:
        return None
    return Path(_HANDLER.streams[-1].name)


@contextlib.contextmanager
def stage_log(path: Path) -> Iterator[Optional[Path]]:
    """Library chatter of the block goes to ``path`` (appended; a nested block, e.g. a table running its rows,
    writes to its own file meanwhile). A no-op yielding None unless :func:`quiet_libraries` ran."""
    if _HANDLER is None:
        yield None
        return
    adopt_library_loggers()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        _HANDLER.streams.append(fh)
        try:
            yield path
        finally:
            _HANDLER.streams.remove(fh)
            adopt_library_loggers()
