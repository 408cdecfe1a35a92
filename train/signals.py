"""Stop training cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C): finish the step, checkpoint, exit.

The handler only records the signal; the loop asks `requested()` after each step. A second signal acts as if
nothing were installed (SIGINT: KeyboardInterrupt; SIGTERM: the process ends), for a user who will not wait.
"""
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(RuntimeError):
    """Training stopped on a signal after writing a complete checkpoint; `train.resume=true` continues it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class StopOnSignal:
    """Between `install` and `uninstall`, SIGTERM and SIGINT set `received` instead of ending the process."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested(self, accelerator) -> int | None:
        """The signal any process received: processes agree, so all of them checkpoint and stop together."""
        if accelerator.num_processes == 1:
            return self.received
        got = accelerator.gather(torch.tensor([self.received or 0], device=accelerator.device))
        return int(got.max().item()) or None

    def stopped(self, signum: int, step: int, checkpoint) -> StoppedBySignal:
        """The error that ends the run, after the checkpoint of `step` was written."""
        return StoppedBySignal(signum, f"stopped by {signal.Signals(signum).name} after step {step}; "
                                       f"{checkpoint} is complete: continue with train.resume=true")
