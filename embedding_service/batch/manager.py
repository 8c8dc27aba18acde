"""The batch jobs' manager: one Serve replica on the head that carries out what the store asks.

Jobs enter the store from the gateway's Batch API and the router's CreateJob (status validating); nothing calls
the manager. Each round (jobs.poll_s) it:

- starts a runner (runner.py, a detached named actor) for each waiting job, up to jobs.max_running_jobs;
- starts again the runner of a job in progress whose runner is gone (its node lost, the head restarted, the actor
  killed): Ray Data's checkpoints resume it from the rows written, none twice;
- carries out cancels: the runner is killed (its pool with it, within seconds) and the job ends cancelled with
  the output written so far, marked partial; a job past its deadline (an OpenAI batch's completion window) ends
  the same way, expired;
- releases what Ray Data still reserves for a runner it killed or found gone (ray_data_internals.py): a killed
  driver never cancels its resource request, which would shrink every later job's share until it expired;
- stops the runners of jobs that ended (a detached actor lives, its model's memory held, until it is killed);
- deletes what retention ended (files, jobs and their folders);
- sets the job metrics from the store.

Restarting the manager loses nothing: what it knows is the store's and Ray's (the runners by name).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import ray

from embedding_service.batch.runner import NAMESPACE, JobRunner, finish_stopped, runner_name
from embedding_service.config import ON_HEAD, JobsSettings, Limits, ModelSettings
from embedding_service.jobs.spec import deadline_of, job_folder
from embedding_service.jobs.storage import StorageRoot
from embedding_service.jobs.store import FINAL, STATUSES, JobRecord, now_ms, open_store
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import JobMetrics

logger = service_logger(__name__)

STOP_WAIT_S = 10.0  # how long a stop waits for the killed runner to be gone before it writes the job's files


def runner_of(job_id: str):
    """The job's runner actor, or None when it is gone."""
    try:
        return ray.get_actor(runner_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return None


def _past_deadline(job: JobRecord, now: int) -> bool:
    """Unfinished at its deadline. A batch writing its output files already is left to finish (and, its runner
    lost, is resumed): its lines are all done. _stop reads the job again for the race with its runner."""
    deadline = deadline_of(job.spec, job.created_at)
    return deadline is not None and now >= deadline and job.status != "finalizing"


class JobManager:
    async def __init__(self, jobs: JobsSettings, models: list[ModelSettings], calls: Limits) -> None:
        self.jobs, self.calls = jobs, calls
        self.models = {m.name: m for m in models}
        self.store = await asyncio.to_thread(open_store, jobs)
        self.root = await asyncio.to_thread(StorageRoot.of, jobs)
        self.metrics = JobMetrics()
        # The fence checks Ray Data's shape when imported: here, so a change stops this deployment only.
        from embedding_service.batch.ray_data_internals import release_requests

        self._release_requests = release_requests
        self._seen_running: set[str] = set()
        self._counted: set[str] = set()  # jobs whose end _stop counted already
        self._loop = asyncio.create_task(self._rounds())

    async def _rounds(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.round)
            except Exception:  # a round that failed (the store unreachable) is tried again next time
                logger.exception("jobs: a round of the job manager failed")
            await asyncio.sleep(self.jobs.poll_s)

    def round(self) -> None:
        unfinished = self.store.unfinished()
        runners = {j.id: runner_of(j.id) for j in unfinished}  # one lookup in Ray's names per job and round
        running = [j for j in unfinished if j.status != "validating" or runners[j.id] is not None]
        slots = self.jobs.max_running_jobs - len(running)
        now = now_ms()
        for job in unfinished:
            runner = runners[job.id]
            try:
                if job.cancel_requested:
                    self._stop(job, runner, "cancelled")
                elif _past_deadline(job, now):
                    self._stop(job, runner, "expired")
                elif runner is None and job.status == "validating":
                    if slots > 0:
                        slots -= 1
                        self._start(job, "new")
                elif runner is None:
                    self._start(job, "resumed")
            except Exception:  # one job's failure (its files unreachable) holds up no other job
                logger.exception("jobs: the job manager could not act on job %s", job.id)
        self._reap({j.id for j in unfinished})
        self._expire()
        self._report(unfinished)

    def _start(self, job: JobRecord, reason: str) -> None:
        logger.info("jobs: starting the runner of job %s (%s)", job.id, reason)
        if reason == "resumed":
            self._release(job.id)  # the lost runner's, before the new one's is made
        actor = ray.remote(JobRunner).options(
            name=runner_name(job.id), namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=0,
            resources=dict(ON_HEAD), get_if_exists=True).remote(self.jobs, self.models, self.calls, job.id)
        actor.run.remote()
        self.metrics.runners_started.inc(tags={"reason": reason})

    def _stop(self, job: JobRecord, runner, status: str) -> None:
        current = self.store.job_by_id(job.id)  # the runner may have gone on since the round began
        if current is None or current.status in FINAL or (status == "expired" and current.status == "finalizing"):
            return
        if runner is not None:
            ray.kill(runner, no_restart=True)  # its pool's actors die with their owner
            deadline = time.monotonic() + STOP_WAIT_S
            while runner_of(job.id) is not None and time.monotonic() < deadline:  # never two writers of its files
                time.sleep(0.1)
        self._release(job.id)  # also a runner lost before the stop: its requests outlive it
        logger.info("jobs: job %s %s: its runner was stopped", job.id, status)
        ended = finish_stopped(self.store, self.root, current, status, self.jobs.retention_s, self.jobs.s3_endpoint)
        self._counted.add(job.id)
        self.metrics.jobs_ended.inc(tags={"status": ended.status})

    def _release(self, job_id: str) -> None:
        """Releases what Ray Data still reserves for the job's runner that is gone (ray_data_internals.py)."""
        try:
            released = self._release_requests(runner_name(job_id))
        except Exception as error:  # the job goes on; other jobs get a smaller share until the request expires
            logger.warning("jobs: the Ray Data resource requests of job %s's runner, gone, were not released (%s); "
                           "they hold their share of the cluster until they expire", job_id, error)
            self.metrics.reservations_released.inc(tags={"outcome": "failed"})
            return
        if released:
            logger.info("jobs: released the Ray Data resource requests of job %s's runner, gone: %s", job_id, released)
            self.metrics.reservations_released.inc(len(released), tags={"outcome": "released"})

    def _reap(self, unfinished: set[str]) -> None:
        """Kills the runners whose job this store holds in a final status: their run returned."""
        prefix = runner_name("")
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != NAMESPACE or not entry["name"].startswith(prefix):
                continue
            job_id = entry["name"].removeprefix(prefix)
            if job_id in unfinished:
                continue
            job = self.store.job_by_id(job_id)
            if job is not None and job.status in FINAL:
                runner = runner_of(job_id)
                if runner is not None:
                    ray.kill(runner, no_restart=True)
                    logger.info("jobs: the runner of job %s stopped (the job %s)", job_id, job.status)
                    self._release(job_id)  # its run returned, its requests with it; unless its pool was still up

    def _expire(self) -> None:
        files, jobs = self.store.expire()
        for record in files:
            self.root.delete(record.location)
        for record in jobs:
            self.root.delete(job_folder(self.root.uri, record.id))

    def _report(self, unfinished: list[JobRecord]) -> None:
        counts = Counter(j.status for j in unfinished)
        for status in STATUSES:
            if status not in FINAL:
                self.metrics.jobs.set(counts.get(status, 0), tags={"status": status})
        running = {j.id for j in unfinished}
        ended = [self.store.job_by_id(gone) for gone in self._seen_running - running]
        ended = [j for j in ended if j is not None and j.status in FINAL]
        # An ended job's gauges are set once more, to its final values, then no more: Ray stops exporting a gauge
        # left unset for about 20 s, so the `job` label holds the running jobs and those just ended.
        for job in unfinished + ended:
            tags = {"job": job.id}
            self.metrics.job_rows_done.set(job.completed, tags=tags)
            self.metrics.job_rows_total.set(job.total, tags=tags)
            self.metrics.job_rows_per_second.set(job.rows_per_s, tags=tags)
        for job in ended:
            if job.id not in self._counted:  # a stopped job's end was counted where it was stopped
                self.metrics.jobs_ended.inc(tags={"status": job.status})
            self._counted.discard(job.id)
        self._seen_running = running

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError("the job manager's rounds stopped")
