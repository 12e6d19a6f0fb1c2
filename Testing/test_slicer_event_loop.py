"""The Apply button's code path under an event loop that idles holding the GIL, as Slicer's does.

In the Slicer application the main thread runs Qt's event loop through CTK/PythonQt, which never
release the GIL while the loop waits for events. A worker thread then runs Python only while the
main thread is inside Python code that releases the GIL. Here the loop is imitated by a C call that
keeps the GIL (``usleep`` through ``ctypes.PyDLL``) between timer ticks, and each tick is the
widget's: ``JobMonitor.tick()`` followed by reading the job's progress.
"""

from __future__ import annotations

import ctypes
import sys
import time

import pytest

if sys.platform == "win32":
    pytest.skip("the GIL-holding idle uses libc usleep", allow_module_level=True)

slicer = pytest.importorskip("slicer")
import headless  # noqa: E402

headless.start()
import LiverSegUNet  # noqa: E402
from LiverSegUNet import TICK_INTERVAL_MS, JobMonitor, LiverSegUNetLogic  # noqa: E402

_usleep = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held for the whole call
_usleep.argtypes = [ctypes.c_uint]


def idle_holding_gil(seconds: float) -> None:
    """What Qt's event loop does between timer events in Slicer: wait in C++ without releasing the GIL."""
    _usleep(int(seconds * 1e6))


def run_event_loop(monitor, idle_s, deadline_s, on_tick=None):
    """Tick ``monitor`` as the widget's QTimer does, idling with the GIL held in between; seconds taken, or None."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        finished = monitor.tick()
        if on_tick:
            on_tick(*monitor.job.progress)
        if finished:
            return time.perf_counter() - t0
        idle_holding_gil(idle_s)
    return None


@pytest.fixture(scope="module")
def sample_node():
    slicer.mrmlScene.Clear()
    return LiverSegUNetLogic().loadSampleVolume()


@pytest.fixture(scope="module")
def direct_seconds(sample_node):
    """The fastest of three direct ``segment()`` calls on the same volume and model (no threads, no Slicer)."""
    from LiverSegUNetLib.inference import segment

    logic = LiverSegUNetLogic()
    volume = logic.volumeFromNode(sample_node)
    model = logic.model("cpu")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        segment(volume, model, device="cpu")
        times.append(time.perf_counter() - t)
    return min(times)


def _segmentations():
    return slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()


def test_the_simulated_loop_starves_a_worker_that_is_only_polled(sample_node, direct_seconds):
    """The harness reproduces the stall: ticks that do not wait (the old 100 ms poll) leave the model stuck."""

    class PollOnly(JobMonitor):
        WAIT_S = 0  # join(0) checks without releasing the GIL, like the former ``is_alive()`` poll

    logic = LiverSegUNetLogic()
    before = _segmentations()
    monitor = PollOnly(logic, logic.startJob(sample_node, device="cpu"))
    deadline = 3 * direct_seconds + 2
    took = run_event_loop(monitor, idle_s=0.1, deadline_s=deadline)
    monitor.abandon()
    assert took is None, f"a polled worker finished in {took:.1f} s: the loop does not hold the GIL"
    assert _segmentations() == before


def test_apply_path_runs_at_full_speed_and_reports_progress(sample_node, direct_seconds):
    logic = LiverSegUNetLogic()
    seen = []
    t = time.perf_counter()
    monitor = JobMonitor(logic, logic.startJob(sample_node, device="cpu"))
    took = run_event_loop(
        monitor, idle_s=TICK_INTERVAL_MS / 1000, deadline_s=20 * direct_seconds + 10, on_tick=lambda *p: seen.append(p)
    )
    took = time.perf_counter() - t  # includes copying the input and writing the segment, as a click does
    assert monitor.finished and monitor.error is None, monitor.error
    assert took <= 2 * direct_seconds, f"{took:.2f} s through the monitor vs {direct_seconds:.2f} s direct"
    assert monitor.stats["volume_ml"] > 300
    assert monitor.statusText().startswith("Liver: ")
    liver = monitor.job.outputSegmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    assert liver
    distinct = list(dict.fromkeys(seen))  # the progress bar's successive states
    assert len(distinct) >= 3 and "inference" in {stage for stage, _ in distinct}, distinct
    for stage in {stage for stage, _ in distinct}:
        fractions = [f for s, f in distinct if s == stage]
        assert fractions == sorted(fractions), (stage, fractions)


def test_cancel_under_the_loop_stops_soon_and_changes_nothing(sample_node, direct_seconds):
    logic = LiverSegUNetLogic()
    before = _segmentations()
    monitor = JobMonitor(logic, logic.startJob(sample_node, device="cpu"))
    cancelled_at = []

    def cancel_once_the_model_runs(stage, fraction):
        if not cancelled_at and stage == "inference":
            monitor.cancel()
            cancelled_at.append(time.perf_counter())

    took = run_event_loop(
        monitor, idle_s=TICK_INTERVAL_MS / 1000, deadline_s=20 * direct_seconds + 10, on_tick=cancel_once_the_model_runs
    )
    assert cancelled_at and took is not None
    assert time.perf_counter() - cancelled_at[0] < direct_seconds + 1
    assert monitor.stats is None and monitor.error is None
    assert monitor.statusText() == "Cancelled; the segmentation was not changed."
    assert _segmentations() == before


def test_process_is_the_same_monitor_loop(sample_node, monkeypatch):
    """``Logic.process`` (console, tests) drives the JobMonitor the Apply button uses."""
    ticks = []
    original = JobMonitor.tick
    monkeypatch.setattr(JobMonitor, "tick", lambda self: ticks.append(self) or original(self))
    stats = LiverSegUNetLogic().process(sample_node, device="cpu")
    assert stats is not None and ticks and all(isinstance(m, LiverSegUNet.JobMonitor) for m in ticks)
