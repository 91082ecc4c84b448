"""The two passes on Dask: one task per slide, on a LocalCluster or any running Dask scheduler.

The client (the `precompute run` process) decides what to do exactly as a local run does (the part
keys, what is reused), submits one task per slide to do, and keeps the NMF fit and the assembly.
A task is `passes.run_slide`: it reads its slide on the worker, runs the model there and writes the
slide's part file into the parts folder, atomically, as a local run does; so the parts folder must be
visible to every worker under the same path (a shared filesystem on a cluster), as must the slides.

Each worker loads the model once (from the same model argument the client got, checked against the
client's weights fingerprint) and keeps it for every later task. A worker that dies takes its
slide with it; the scheduler gives the slide to another worker (up to `allowed-failures` times).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.markup import escape

from .activations import compute_signature, pick_device
from .concepts import Concepts
from .models import LoadedModel, ModelSpec, load_model
from .passes import FullPass, Pass, PassStats, SlideOutcome, SlideWork, pass_engine, run_slide
from .tile_stream import SlideJob

LOCAL_PREFIX = "local:"
TASK_RETRIES = 2  # on top of the scheduler's own rescheduling of tasks lost with a dead worker


def check_dask_option(text: str) -> str:
    """`local:N` (N >= 1) or a scheduler address (tcp://host:8786, host:8786, tls://..., a scheduler file
    path ending in .json). Returns the text, or raises ValueError saying what is accepted."""
    if text.startswith(LOCAL_PREFIX):
        n = text[len(LOCAL_PREFIX):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--dask {text!r}: local:N needs a whole number of workers >= 1, e.g. local:2.")
        return text
    if "://" in text or ":" in text or text.endswith(".json"):
        return text
    raise ValueError(f"--dask {text!r} is neither local:N (a cluster of N worker processes on this machine) nor "
                     "a scheduler address such as tcp://10.0.0.5:8786 or a scheduler file (*.json).")


class WorkerSetupError(ValueError):
    """A worker cannot compute parts that match the client's (other weights, other device): the run
    stops with this message (exit code 2) instead of mixing parts."""


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 (16 hex) of every parameter and buffer: the same weights give the same fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelRef:
    """How a worker loads the client's model: the same model argument and arch, the client's spec
    (with the input overrides applied), and the fingerprint its weights must have."""

    source: str
    arch: str | None
    spec: ModelSpec
    fingerprint: str


class _WorkerModel:
    """A model loaded on a worker, kept for every later task; `lock` serialises tasks that share it
    (a worker with several threads), since the layer hook is per model."""

    def __init__(self, ref: ModelRef, device_name: str):
        loaded = load_model(ref.source, arch=ref.arch)
        got = weights_fingerprint(loaded.module)
        if got != ref.fingerprint:
            raise WorkerSetupError(f"a Dask worker loaded {ref.source!r} with weights {got}, the client has "
                                   f"{ref.fingerprint}: give every node the same model file (same path, same "
                                   "content); a model factory must build the same weights at every call (seed it "
                                   "or load saved weights).")
        self.module = loaded.module
        self.spec = ref.spec
        self.device = pick_device(device_name)
        self.lock = threading.Lock()


_MODELS: dict[tuple, _WorkerModel] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(ref: ModelRef, device_name: str) -> _WorkerModel:
    key = (ref, device_name)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per worker: a new run's model replaces the last one
            _MODELS[key] = _WorkerModel(ref, device_name)
        return _MODELS[key]


def slide_task(kind: Pass, job: SlideJob, ref: ModelRef, folder: str, key: str) -> SlideOutcome:
    """Runs on a worker: one slide of one pass, its part written into `folder`."""
    cfg = kind.cfg
    wm = _worker_model(ref, cfg.device)
    here = compute_signature(wm.device)
    if here != cfg.compute:
        raise WorkerSetupError(f"a Dask worker computes in {here}, the run's parts are {cfg.compute}: a run needs "
                           "identical workers (same device type and precision).")
    if isinstance(kind, FullPass):
        kind = dataclasses.replace(kind, concepts=_aligned(kind.concepts))
    with wm.lock, pass_engine(kind, wm.module, wm.spec, cfg.layer, wm.device) as engine:
        return run_slide(kind, job, engine, Path(folder), key)


def _aligned(c: Concepts | None) -> Concepts | None:
    """Arrays received from the scheduler may sit at any byte offset of a message buffer; float32 kernels
    sum in a different order on unaligned data, so H is copied into freshly allocated memory to give
    the bits a local run gives."""
    if c is None:
        return None
    copy = (lambda a: None if a is None else np.array(a, dtype=np.float32, copy=True))
    return Concepts(copy(c.H), copy(c.shift), copy(c.scale))


def _start_client(target: str, say: Callable[[str], None]):
    from distributed import Client, LocalCluster

    if target.startswith(LOCAL_PREFIX):
        n = int(target[len(LOCAL_PREFIX):])
        # One thread per worker: the model uses the worker's cores itself (torch threads).
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = Client(cluster)
        say(f"Dask: a local cluster of {n} worker processes")
        return client, cluster
    if target.endswith(".json"):
        client = Client(scheduler_file=target, timeout="60s")
    else:
        client = Client(target, timeout="60s")
    n = len(client.scheduler_info().get("workers", {}))
    say(f"Dask: scheduler {escape(target)} with {n} workers now (more may join)")
    return client, None


class DaskPasses:
    """Runs the passes as one Dask task per slide; the client side of a `--dask` run."""

    def __init__(self, target: str, loaded: LoadedModel, arch: str | None, *, say: Callable[[str], None]):
        check_dask_option(target)
        try:
            self.client, self.cluster = _start_client(target, say)
        except OSError as exc:
            raise ValueError(f"--dask {target}: cannot reach the Dask scheduler ({exc}). Start it first "
                             "(see README, 'Many GPUs or a cluster') or use --dask local:N.") from exc
        services = self.client.scheduler_info().get("services", {})
        if "dashboard" in services:
            say(f"Dask dashboard: {escape(self.client.dashboard_link)}")
        else:
            say("Dask dashboard: not available (pip install -r requirements-cluster.txt adds it)")
        self.ref = ModelRef(loaded.source, arch, loaded.spec, weights_fingerprint(loaded.module))

    def compute_signature(self, device_name: str) -> str:
        """Device type and precision the workers compute in (part keys carry it); the client's own
        device does not matter. Raises ValueError when the workers differ."""
        def probe(name: str) -> str:
            return compute_signature(pick_device(name))
        try:
            seen = self.client.run(probe, device_name)
        except ValueError as exc:  # pick_device: e.g. --device cuda on CPU-only workers
            raise ValueError(f"on the Dask workers: {exc}") from exc
        kinds = sorted(set(seen.values()))
        if len(kinds) > 1:
            raise ValueError("the Dask workers differ in device or precision (" + ", ".join(
                f"{w}: {k}" for w, k in seen.items()) + "); a run needs identical workers.")
        if not kinds:
            raise ValueError("the Dask scheduler has no workers yet; start some, then run again.")
        return kinds[0]

    def run_pass(self, kind: Pass, jobs: list[SlideJob], folder: Path, key: str, *,
                 on_tiles: Callable[[int], None], on_slide: Callable[[str, str, dict], None]) -> PassStats:
        """Submit one task per job; report each slide as it ends (in completion order)."""
        from distributed import as_completed
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        stats = PassStats()
        if not jobs:
            return stats
        futures = {}
        for job in jobs:
            fut = self.client.submit(slide_task, kind, job, self.ref, str(folder), key,
                                     key=f"lumen-{kind.name}-{key}-{job.index}", retries=TASK_RETRIES, pure=False)
            futures[fut] = job
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    outcome = fut.result()
                except (KilledWorker, FutureCancelledError) as exc:
                    outcome = _lost_slide(kind, job, folder, key, exc)
                stats.add(outcome)
                on_tiles(outcome.tiles)
                on_slide(outcome.slide_id, outcome.status, outcome.info)
        except BaseException:
            self.client.cancel(list(futures))
            raise
        return stats

    def close(self) -> None:
        """Disconnect (and stop a local cluster); safe to call twice."""
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None


def _lost_slide(kind: Pass, job: SlideJob, folder: Path, key: str, exc: BaseException) -> SlideOutcome:
    """A slide whose workers kept dying: recorded as failed (a re-run retries it)."""
    error = (f"the Dask workers processing it died repeatedly ({type(exc).__name__}); look for out-of-memory "
             "kills in the worker logs, then run the same command again to retry it")
    return SlideWork(kind, job, folder, key).fail(error)
