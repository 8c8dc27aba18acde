"""`python -m benchmarks --jobs`: one corpus embedded three ways on one machine, in one run.

- in-process: the model loaded with the replicas' own path (model/forward.py load_model: the config's backend,
  precision and threads) and run over a sample of the corpus with embed_texts, as a job's model actor runs it: the
  limit of that backend here. It runs before the service starts and again after it stops, and the limit is the
  mean of the two: a shared VM's rate drifts over the minutes between them (185, 173 and 157 rows/s seen in three
  runs in a row on the AVX2-only EPYC);
- in-process in the job's layout: as many processes of one thread each as the machine has cores, run at once
  (the job's pool here is one model actor of one thread per core): the limit of that layout without Ray, measured
  before and after the service as above;
- the bulk CLI (`python -m embedding_client embed`) through the online service (its proxy, router and replica);
- a batch job on Ray Data (client.submit_job, Parquet in and out) on the same service, first on a quarter of the
  corpus, then on all of it: its rows/s, and the peak memory of its processes, which must not grow with the
  corpus (the job streams it).

The corpus is the packaged sentences (the accuracy gate's and calibration's, 5,183 of news and documentation
prose) repeated to --jobs-rows rows, each with its own id.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from embedding_service.ops.servefile import ServeFile

ROW_GROUP = 10_000
ACTOR_THREADS = 1  # a job's model actors on CPU: one thread each, one actor per core
SAMPLE_S = 1.0  # the job's memory is a plateau; sampling oftener took CPU from the job it measures


def packaged_sentences() -> list[str]:
    from embedding_service.model.accuracy import corpus

    packaged = corpus()
    return list(packaged.gate) + list(packaged.calibration)


def write_corpus(path: Path, rows: int, sentences: list[str]) -> Path:
    """`rows` rows (id, text) of the sentences repeated, written a row group at a time."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            ids = range(start, min(rows, start + ROW_GROUP))
            writer.write_table(pa.table({"id": [f"r{i}" for i in ids],
                                         "text": [sentences[i % len(sentences)] for i in ids]}, schema=schema))
    return path


def in_process(config: ServeFile, sentences: list[str], sample: int, batch: int, threads: int | None = None,
               start=None) -> dict:
    """Rows/s of the config's first model (with `threads` where given), loaded and run as a job's model actor loads
    and runs it. `start`: a barrier the run waits at once the model is loaded and warm."""
    from embedding_service.model.forward import embed_texts, load_model

    settings = config.args.models[0]
    if threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    loaded = load_model(settings)
    texts = [sentences[i % len(sentences)] for i in range(sample)]
    embed_texts(loaded, settings, texts[:batch])  # warm
    if start is not None:
        start.wait()
    begin = time.perf_counter()
    for i in range(0, sample, batch):
        embed_texts(loaded, settings, texts[i : i + batch])
    took = time.perf_counter() - begin
    out = {"rows": sample, "seconds": took, "rows_per_s": sample / took, "backend": loaded.backend,
           "threads": settings.threads, "batch": batch}
    del loaded
    gc.collect()
    return out


def _in_process_worker(raw: dict, sentences: list[str], sample: int, batch: int, threads: int, start, out) -> None:
    out.put(in_process(ServeFile.parse(raw), sentences, sample, batch, threads, start))


def in_process_layout(config: ServeFile, sentences: list[str], sample: int, batch: int, processes: int,
                      threads: int) -> dict:
    """Rows/s of `processes` processes of `threads` threads each, started together once all are loaded: the job's
    layout of model actors without Ray, the limit of that layout on this machine."""
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_in_process_worker,
                               args=(config.raw, sentences, sample, batch, threads, start, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    runs = [out.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    return {"processes": processes, "threads": threads, "rows": sample * processes, "batch": batch,
            "backend": runs[0]["backend"], "rows_per_s": sum(run["rows_per_s"] for run in runs),
            "seconds": max(run["seconds"] for run in runs)}


def bracketed(before: dict, after: dict) -> dict:
    """An in-process limit: the run before the service with the mean rate of it and the run after."""
    return {**before, "rows_per_s": (before["rows_per_s"] + after["rows_per_s"]) / 2}


# Ray's processes that are not the job's: the online service's, Ray's own, and workers idle between tasks.
NOT_THE_JOBS = ("ray::IDLE", "ray::ServeReplica", "ray::ServeController", "ray::ProxyActor", "ray::DashboardAgent",
                "ray::RuntimeEnvAgent", "ray::JobManager")


class PeakMemory:
    """The most resident memory the job's processes held at once, sampled every SAMPLE_S: Ray's worker processes
    busy with anything but the online service (the job's runner, its model actor, its read, checkpoint-filter and
    write tasks)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _total() -> int:
        total = 0
        for process in psutil.process_iter(["cmdline", "memory_info"]):
            title = " ".join(process.info["cmdline"] or [])
            if title.startswith("ray::") and not title.startswith(NOT_THE_JOBS) and process.info["memory_info"]:
                total += process.info["memory_info"].rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self._total())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_job(target: str, model: str, corpus: Path, output: Path) -> dict:
    from embedding_client import EmbedClient

    rows = pq.read_metadata(corpus).num_rows
    with EmbedClient(target) as client, PeakMemory() as memory:
        start = time.perf_counter()
        job = client.submit_job(str(corpus), input_format="parquet", model=model, text_column="text",
                                id_column="id", output_uri=str(output))
        job.wait(timeout_s=6 * 3600, progress=False)
        took = time.perf_counter() - start
    written = sum(pq.read_metadata(p).num_rows for p in output.glob("*.parquet"))
    if job.status != "completed" or written != rows:
        raise RuntimeError(f"job {job.id} ended {job.status} with {written} of {rows} rows: {job.message.errors}")
    times = job.message.status_times_ms
    running_s = (times["completed"] - times["in_progress"]) / 1000  # the pool's time, without the job's start
    return {"rows": rows, "seconds": took, "rows_per_s": rows / took, "in_progress_s": running_s,
            "in_progress_rows_per_s": rows / running_s, "peak_rss_mib": memory.peak / 2**20, "job_id": job.id}


def run_bulk_cli(target: str, model: str, corpus: Path, output: Path) -> dict:
    rows = pq.read_metadata(corpus).num_rows
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "embedding_client", "embed", str(corpus), str(output), "--target", target,
                    "--model", model, "--field", "text", "--no-progress"], check=True)
    took = time.perf_counter() - start
    written = pq.read_metadata(output).num_rows
    if written != rows:
        raise RuntimeError(f"the bulk CLI wrote {written} of {rows} rows")
    return {"rows": rows, "seconds": took, "rows_per_s": rows / took}


def with_jobs(config: ServeFile, work: Path, actors: int) -> ServeFile:
    """The config with batch jobs on: their files under `work`; a job's pool laid out for a CPU node, `actors`
    model actors of one thread each (docs/batch-jobs.md), reserving no CPUs (the online replicas hold this
    machine's)."""
    raw = config.raw
    app = next(a for a in raw["applications"] if a["import_path"].endswith(":build_app"))
    app["args"]["jobs"] = {"storage_root": str(work / "jobs"), "dataset_roots": [str(work)], "min_actors": actors,
                           "max_actors": actors, "num_cpus_per_actor": 0, "threads_per_actor": ACTOR_THREADS}
    return ServeFile.parse(raw)


def main(opts: argparse.Namespace, config: ServeFile, ray_init_kwargs: dict) -> dict:
    from embedding_service.ops import launcher

    work = Path(tempfile.mkdtemp(prefix="jobs-benchmark-"))
    actors = max(1, (os.cpu_count() or 1) // ACTOR_THREADS)
    config = with_jobs(config, work, actors)
    config.export_app_env()
    model = config.args.models[0].name
    rows = opts.jobs_rows
    sentences = packaged_sentences()
    corpus = write_corpus(work / "corpus.parquet", rows, sentences)
    quarter = write_corpus(work / "corpus-quarter.parquet", rows // 4, sentences)
    jobs_settings = config.args.jobs
    results: dict = {"mode": "jobs", "rows": rows, "machine": {"cpus": os.cpu_count()},
                     "model": model, "packaged_sentences": len(sentences),
                     "jobs": jobs_settings.model_dump(mode="json")}
    sample = min(rows, opts.jobs_sample or len(sentences))  # a whole cycle: the corpus's mix of lengths
    batch = jobs_settings.rows_per_batch
    before = in_process(config, sentences, sample, batch)
    before_layout = in_process_layout(config, sentences, sample, batch, actors, ACTOR_THREADS)
    target = launcher.start(config, ray_init_kwargs={"include_dashboard": False, "log_to_driver": False,
                                                     **ray_init_kwargs})
    try:
        results["job_quarter"] = run_job(target, model, quarter, work / "out-quarter")
        results["job"] = run_job(target, model, corpus, work / "out")
        results["bulk_cli"] = run_bulk_cli(target, model, corpus, work / "bulk.parquet")
    finally:
        launcher.stop()
        shutil.rmtree(work, ignore_errors=True)  # the corpora and outputs: hundreds of MB
    after = in_process(config, sentences, sample, batch)
    after_layout = in_process_layout(config, sentences, sample, batch, actors, ACTOR_THREADS)
    results["in_process_runs"] = [before, after]
    results["in_process"] = bracketed(before, after)
    results["in_process_layout_runs"] = [before_layout, after_layout]
    results["in_process_layout"] = bracketed(before_layout, after_layout)
    job, limit, bulk = results["job"], results["in_process"], results["bulk_cli"]
    layout = results["in_process_layout"]
    results["ratios"] = {"job_to_in_process": job["rows_per_s"] / limit["rows_per_s"],
                         "job_to_in_process_layout": job["rows_per_s"] / layout["rows_per_s"],
                         "job_to_bulk_cli": job["rows_per_s"] / bulk["rows_per_s"],
                         "bulk_cli_to_in_process": bulk["rows_per_s"] / limit["rows_per_s"],
                         "peak_memory_full_to_quarter": job["peak_rss_mib"]
                         / max(results["job_quarter"]["peak_rss_mib"], 1e-9)}
    return results


def table(r: dict) -> str:
    ip, job, quarter, bulk, ratio = r["in_process"], r["job"], r["job_quarter"], r["bulk_cli"], r["ratios"]
    lay = r["in_process_layout"]
    return "\n".join([
        f"{r['rows']:,} rows of {r['packaged_sentences']:,} packaged sentences, model {r['model']}, "
        f"{r['machine']['cpus']} CPUs",
        f"in-process ({ip['backend']}, {ip['threads']} threads, {ip['rows']:,} rows a run in batches of {ip['batch']}): "
        f"{ip['rows_per_s']:.0f} rows/s"
        + (" (before the service, after it: " + ", ".join(f"{run['rows_per_s']:.0f}" for run in r["in_process_runs"])
           + ")" if "in_process_runs" in r else ""),
        f"in-process in the job's layout ({lay['processes']} processes of {lay['threads']} threads at once): "
        f"{lay['rows_per_s']:.0f} rows/s (before the service, after it: "
        + ", ".join(f"{run['rows_per_s']:.0f}" for run in r["in_process_layout_runs"]) + ")",
        f"batch job on Ray Data ({r['jobs']['max_actors']} model actors of {r['jobs']['threads_per_actor']} "
        f"threads): {job['rows_per_s']:.0f} rows/s ({job['seconds']:.0f} s from submit to completed), "
        f"{ratio['job_to_in_process']:.2f}x in-process, {ratio['job_to_in_process_layout']:.2f}x in-process in its "
        f"layout, {ratio['job_to_bulk_cli']:.2f}x the bulk CLI; "
        f"{job['in_progress_rows_per_s']:.0f} rows/s in progress ({job['in_progress_s']:.0f} s, without its start)",
        f"bulk CLI through the service: {bulk['rows_per_s']:.0f} rows/s ({bulk['seconds']:.0f} s), "
        f"{ratio['bulk_cli_to_in_process']:.2f}x in-process",
        f"the job's processes' peak memory (RSS): {job['peak_rss_mib']:.0f} MiB for {job['rows']:,} rows, "
        f"{quarter['peak_rss_mib']:.0f} MiB for {quarter['rows']:,} "
        f"({ratio['peak_memory_full_to_quarter']:.2f}x)",
    ])


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["in-process", "in-process,\njob's layout", "batch job", "bulk CLI"]
    rates = [r["in_process"]["rows_per_s"], r["in_process_layout"]["rows_per_s"], r["job"]["rows_per_s"],
             r["bulk_cli"]["rows_per_s"]]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar(names, rates, color=["#888888", "#bbbbbb", "#1f77b4", "#ff7f0e"])
    axes.set_ylabel("rows/s")
    axes.set_title(f"{r['rows']:,} rows, {r['model']}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
