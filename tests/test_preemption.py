"""Stop signals, delivered for real to this process: one signal that arrives twice is one request."""

from __future__ import annotations

import os
import signal

import pytest

from curry_train.checkpoint.preemption import Preemption, StopNow


def test_a_signal_delivered_twice_at_once_is_one_request_and_a_repeat_during_the_save_stops() -> None:
    # SLURM signals every process of a step and `curry-train run` passes the same signal on: a worker gets it twice.
    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested and preemption.received == signal.SIGTERM
        preemption.saving = True  # the save the signal asked for has begun: now a repeat means "stop now"
        with pytest.raises(StopNow, match="SIGTERM received twice"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        preemption.uninstall()


def test_another_signal_at_once_is_a_second_request() -> None:
    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(StopNow, match="SIGINT received after SIGUSR1"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.uninstall()


def test_a_signal_after_the_last_save_is_ignored() -> None:
    # The launch has saved and journaled its end: a late (second) signal must not kill it into a failure status.
    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        preemption.saving = True
        preemption.settle()
        os.kill(os.getpid(), signal.SIGTERM)  # would raise StopNow before settle()
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received == signal.SIGTERM
    finally:
        preemption.uninstall()
