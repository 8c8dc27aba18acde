"""A job's Ray Data pipeline: read, embed in a pool of model actors, write Parquet, with Ray Data's own
row-level checkpoints (a restarted job skips the rows written already, and never writes one twice).

    read (JSONL / Parquet, through the storage root's pyarrow filesystem)
      -> map_batches(ModelActor, ActorPoolStrategy(min_actors, max_actors), num_cpus/num_gpus per actor,
                     the model's threads per actor)
      -> write_parquet (two-phase: pending checkpoint, data file, committed checkpoint)

The job's execution is bounded to a share of the cluster's CPUs (jobs.cluster_cpu_share) and its actors hold their
own reservations, so the online replicas keep theirs. Progress is read from the committed checkpoints (their
Parquet footers' row counts), which are exactly the rows written.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from embedding_service.batch.model_actor import ModelActor, actor_model
from embedding_service.config import JobsSettings, Limits, ModelSettings
from embedding_service.jobs.spec import JobSpec
from embedding_service.jobs.storage import StorageRoot, filesystem_for

PENDING = ".pending.parquet"
# Read and write tasks are light next to the model actors: a quarter CPU each keeps them from crowding the pool.
IO_TASK_CPUS = 0.25
FILTER_ACTORS = 1


@dataclass(frozen=True)
class Plan:
    """Where one run of a job reads and writes."""

    input_uri: str
    input_format: str  # parquet | jsonl (an OpenAI file runs as the Parquet its validation wrote)
    id_column: str
    output_uri: str
    checkpoint_uri: str


def run_pool(name: str, spec: JobSpec, model: ModelSettings, jobs: JobsSettings, calls: Limits, root: StorageRoot,
             plan: Plan) -> None:
    """Runs the job's pipeline to its end, resuming from the checkpoints a previous run left."""
    import ray
    import ray.data
    from ray.data import DataContext, ExecutionResources
    from ray.data.checkpoint import CheckpointConfig

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.target_max_block_size = jobs.block_bytes
    # Parquet's V2 reader lists files in a 1-CPU task and reads footers in 32 actors: on a small cluster those
    # took the CPUs the job's own reads needed (a resumed job waited minutes). V1 reads a file in a task.
    context.use_datasource_v2 = False
    # A failing block's own error, not Ray Data's UserCodeException around it: that wrapper reaches the runner
    # without its cause (the job's error would say only "UDF failed to process a data block").
    context.raise_original_map_exception = True
    checkpoints = CheckpointConfig(
        id_column=plan.id_column, checkpoint_path=root.path_of(plan.checkpoint_uri),
        override_filesystem=root.filesystem, delete_checkpoint_on_success=False)
    # A resumed job filters the rows written already in a pool of 1-CPU actors (up to 10 by default): one is
    # enough for ids, and more would take the CPUs its reads need (seen: a resumed job hung, its reads unplaced).
    if not hasattr(checkpoints, "checkpoint_actor_pool_max_size"):
        raise RuntimeError("ray.data.checkpoint.CheckpointConfig has no checkpoint_actor_pool_max_size: this Ray "
                           "is not the release the jobs were built on (requirements/service.txt)")
    checkpoints.checkpoint_actor_pool_max_size = FILTER_ACTORS
    context.checkpoint_config = checkpoints
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    floor = jobs.num_cpus_per_actor * jobs.min_actors + FILTER_ACTORS + 2 * IO_TASK_CPUS
    context.execution_options.resource_limits = ExecutionResources.for_limits(
        cpu=max(floor, jobs.cluster_cpu_share * cluster_cpus))
    # A dataset may lie outside the storage root (a dataset root of its own): each URI is opened by its scheme.
    in_fs, source = filesystem_for(plan.input_uri, jobs.s3_endpoint)
    out_fs, target = filesystem_for(plan.output_uri, jobs.s3_endpoint)
    if plan.input_format == "parquet":
        dataset = ray.data.read_parquet(source, filesystem=in_fs, num_cpus=IO_TASK_CPUS)
    else:
        dataset = ray.data.read_json(source, filesystem=in_fs, num_cpus=IO_TASK_CPUS,  # JSON lines (pyarrow)
                                     file_extensions=None)
    dataset = dataset.map_batches(**embedding_stage(spec, model, jobs, calls))
    dataset.set_name(name)  # how the pool shows in Ray's dashboard
    dataset.write_parquet(target, filesystem=out_fs, ray_remote_args={"num_cpus": IO_TASK_CPUS})


def embedding_stage(spec: JobSpec, model: ModelSettings, jobs: JobsSettings, calls: Limits) -> dict:
    """map_batches' arguments for the job's pool: the model actor (the model's threads per actor), its pool's
    bounds and each actor's resources. Ray sends the class by reference, so the runner imports its module: that
    module imports the model's code only in the actor."""
    from ray.data import ActorPoolStrategy

    return {"fn": ModelActor, "fn_constructor_args": (actor_model(model, jobs), spec, calls),
            "batch_format": "pyarrow", "batch_size": jobs.rows_per_batch,
            "compute": ActorPoolStrategy(min_size=jobs.min_actors, max_size=jobs.max_actors),
            "num_cpus": jobs.num_cpus_per_actor, "num_gpus": jobs.num_gpus_per_actor,
            "resources": dict(jobs.actor_resources) or None}


class WrittenRows:
    """Rows whose output is written: the committed checkpoints' row counts, as a job goes on. A committed
    checkpoint is never written again, so each file's footer is read once: a count costs a listing and the new
    files' footers, not a read of every file each second of a long job."""

    def __init__(self, root: StorageRoot, checkpoint_uri: str) -> None:
        self.root, self.checkpoint_uri = root, checkpoint_uri
        self._rows: dict[str, int] = {}

    def count(self) -> int:
        committed = [p for p in self.root.listing(self.checkpoint_uri, ".parquet") if not p.endswith(PENDING)]
        for path in committed:
            if path not in self._rows:
                try:
                    self._rows[path] = pq.read_metadata(path, filesystem=self.root.filesystem).num_rows
                except (OSError, ValueError):  # deleted or being renamed meanwhile: counted next time
                    continue
        kept = set(committed)
        self._rows = {path: rows for path, rows in self._rows.items() if path in kept}
        return sum(self._rows.values())


def rows_written(root: StorageRoot, checkpoint_uri: str) -> int:
    """Rows whose output is written, counted once."""
    return WrittenRows(root, checkpoint_uri).count()
