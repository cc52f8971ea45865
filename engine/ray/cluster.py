"""What every Ray stage shares: joining or starting the cluster, pools that fit it, Ray Data's ordering."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray
import ray.data

from engine.config import DistillConfig, RuntimeConfig


# Ray kills a task worker idle for more than 1 s once a node has more workers than CPUs, and long-lived actors
# (Ray Train's controller and workers, Ray Data's split coordinator, Tune's trials) count toward that limit. A
# stream's read/decode workers go idle whenever training holds it back, so each epoch re-started them (a Python
# process with pyarrow, numpy and PIL imported: ~1 s of CPU each): on 2 cores the rehearsal's streamed epochs
# spent ~3 of their ~4 CPU-seconds of data work starting workers. Kept for a minute, they live through the
# stream's pauses; cluster.yaml gives every node the same setting.
IDLE_WORKER_KEEP_MS = 60_000


def init_ray(runtime: RuntimeConfig) -> None:
    """Join the cluster a `ray job submit` runs in, or start a local one sized by the config."""
    if ray.is_initialized():
        return
    from engine.ray.console import library_log, native_stderr_to_log, route_library_logs

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers' output reaches this console only when the job shows the libraries' logs (--verbose).
    console = {"log_to_driver": library_log() is None}
    with native_stderr_to_log():
        if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by a user pointing at a cluster
            ray.init(**console)
        else:  # "local": never attach by surprise to a cluster some earlier `ray start` left running
            # Read by the raylet this process starts (it inherits the environment); a user's own setting wins.
            os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_KEEP_MS))
            # The dashboard (on 127.0.0.1 only) serves the state API that Ray Train's controller polls.
            ray.init(address="local", num_cpus=runtime.num_cpus or None, dashboard_host="127.0.0.1",
                     object_store_memory=runtime.object_store_mb * 2**20 or None, **console)
    route_library_logs()  # ray.init installs its console handlers again
    ray.data.DataContext.get_current().enable_progress_bars = True


def deterministic_order() -> None:
    """Blocks are bundled into batches in input order, so a re-run (or a retried task) sees the same batches and
    the outputs are byte-identical."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True


# Ray Data's read tasks (and the decode/convert tasks fused with them) ask for one CPU each; the decode stage's
# PNG-writing tasks for half of one (they are light, and a one-actor decode then fits in 2 CPUs beside a trial).
TASK_CPUS = 1.0
WRITE_TASK_CPUS = 0.5
STREAM_TASK_CPUS = 0.5  # Ray Data read/decode tasks feeding the trainers: they must fit beside the trainers


@dataclass(frozen=True)
class StageResources:
    """What a run's Ray stages ask for, declared once: the executors (the evaluation's trainer count and teacher
    threads, a sweep's trial concurrency) read these instead of redoing the arithmetic."""

    trainer_cpus: float  # one trainer: its workers' CPUs together
    trainer_gpus: float  # one trainer: a GPU per worker when it trains on GPUs, else 0
    stream_cpus: float  # the CPU a streamed split's Ray Data tasks need free beside the trainers reading it
    decode_cpus: float  # the decode stage: its actors and the tasks writing their PNGs
    decode_gpus: float

    def trainer_and_stream_cpus(self, streams: bool) -> float:
        """A trainer's CPUs, with its stream's when it reads a split through Ray Data."""
        return self.trainer_cpus + (self.stream_cpus if streams else 0.0)

    def trainers_fitting(self, cpus: float, gpus: float, streams: bool) -> int:
        """Trainers that `cpus` and `gpus` hold beside the CPU their stream needs (capped: a cluster without a
        maximum holds as many as there are jobs)."""
        def how_many(amount: float, each: float) -> int:
            return 1 << 30 if math.isinf(amount) else int((amount + 1e-9) // each)

        fits = how_many(cpus - (self.stream_cpus if streams else 0.0), self.trainer_cpus)
        return min(fits, how_many(gpus, self.trainer_gpus)) if self.trainer_gpus else fits


def stage_resources(config: DistillConfig) -> StageResources:
    """The resources each stage of `config` declares. A trainer's stream needs the CPU its read/decode tasks ask
    for (STREAM_TASK_CPUS) free beside it, for every source: the engine's readers (engine/ray/readers.py) start no
    1-CPU ListFiles task, as Ray Data's read_parquet did (with 0.99 CPU free it waited forever). Measured on 2 CPUs:
    a parquet sweep whose trial holds 0.01 CPU beside a 1-CPU trainer streams its test split and finishes (2 trials,
    133 s), where a whole CPU used to be reserved for the stream and the same sweep was refused."""
    runtime = config.runtime
    return StageResources(
        trainer_cpus=runtime.train_workers * runtime.train_cpus_per_worker,
        trainer_gpus=float(runtime.train_workers * int(runtime.train_use_gpu)),
        stream_cpus=STREAM_TASK_CPUS,
        decode_cpus=runtime.decode_actors * runtime.decode_cpus_per_actor + WRITE_TASK_CPUS,
        decode_gpus=runtime.decode_actors * runtime.gpus_per_actor)


def check_pool_fits(stage: str, actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0,
                    task_cpus: float = TASK_CPUS) -> None:
    """Refuse an actor pool that would hold every CPU while its own input still has to be read (or its output
    written) by Ray Data tasks: those would never be scheduled and the stage would hang without a word (seen: two
    1-CPU encode actors on 2 CPUs, no progress for 13 minutes). Checked on a one-node Ray, whose size is known;
    GPU actors and multi-node clusters (where the autoscaler may add nodes) are left to Ray."""
    from engine.config import RunError

    alive = [node for node in ray.nodes() if node.get("Alive")]
    if gpus_per_actor > 0 or len(alive) != 1:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    held = actors * cpus_per_actor
    if held + task_cpus > total + 1e-9:
        raise RunError(
            f"the {stage} stage's {actors} actor(s) x {cpus_per_actor:g} CPU leave {total - held:g} of {total:g} "
            f"CPUs for the Ray Data tasks that feed them ({task_cpus:g} CPU each): the stage could never make "
            f"progress. Lower runtime.{stage}_actors or runtime.{stage}_cpus_per_actor (a fraction such as 0.5 "
            f"is fine: runtime.{stage}_threads_per_actor sets the actor's threads).")


@dataclass(frozen=True)
class Capacity:
    """The CPUs and GPUs a stage may plan for: the cluster at its largest when an autoscaler published how far it
    may grow (`autoscaled`), else the resources alive now."""

    cpus: float
    gpus: float
    autoscaled: bool


def autoscaler_max_resources() -> dict[str, float] | None:
    """{resource: amount} the autoscaler may grow the cluster to (each node group's max_workers x its resources,
    capped by the cluster's max_resources), as it published them in Ray's GCS (a `ray up` or KubeRay cluster);
    None without one (a local Ray, a fixed cluster). A group without a maximum makes the amounts infinite."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: a Ray without it plans on the resources alive, as before
        return None
    if config is None or not config.node_group_configs:
        return None
    total: dict[str, float] = {}
    for group in config.node_group_configs:
        count = math.inf if group.max_count < 0 else group.max_count
        for name, amount in group.resources.items():
            total[name] = total.get(name, 0.0) + (amount * count if amount else 0.0)
    return {name: min(amount, config.max_resources.get(name, math.inf)) for name, amount in total.items()}


def cluster_capacity() -> Capacity:
    """What the cluster holds at its largest: an autoscaling cluster that starts at zero GPU workers still plans
    for every GPU it may add (the requests wait while the autoscaler adds the nodes)."""
    alive = ray.cluster_resources()
    most = autoscaler_max_resources()
    if most is None:
        return Capacity(alive.get("CPU", 0.0), alive.get("GPU", 0.0), False)
    return Capacity(max(alive.get("CPU", 0.0), most.get("CPU", 0.0)),
                    max(alive.get("GPU", 0.0), most.get("GPU", 0.0)), True)


def largest_node() -> dict[str, float]:
    """The resources of the alive node with the most CPUs (where one process can take the most threads)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return max(nodes, key=lambda resources: resources.get("CPU", 0.0), default={})


def shuffle_on_disk(enabled: bool) -> None:
    """Hash shuffles (the encode stage's group-by-class) through files on each node's local disk instead of the
    object store, so their memory stays bounded whatever the dataset size. The shuffle's map buffers its input per
    node, in the object store, until `shuffle_input_batch_bytes` (Ray's default 1 GiB) have come: with a store of
    a few GiB that buffer alone exhausts Ray Data's budget (half the store), and the encoder pool upstream is held
    to one task at a time (measured: a 1 GiB store, the stage at ~0.7x the bare loop). So the buffer is kept to an
    eighth of the smallest node's store (unchanged on nodes of 8 GiB and more)."""
    context = ray.data.DataContext.get_current()
    context.use_disk_based_hash_shuffle = enabled
    stores = [node["Resources"].get("object_store_memory", 0) for node in ray.nodes() if node.get("Alive")]
    smallest = min((size for size in stores if size), default=0)
    if smallest:
        context.shuffle_input_batch_bytes = int(min(context.shuffle_input_batch_bytes, smallest // 8))


def wait_for_pool(timeout_s: float) -> None:
    """An actor pool starts work only once all its actors are up (or fails after `timeout_s`, naming the wait),
    so every actor gets its share of the input; on a cluster the timeout covers the autoscaler adding nodes."""
    ray.data.DataContext.get_current().wait_for_min_actors_s = int(timeout_s)


@dataclass(frozen=True)
class ClusterSpan:
    """How far a job's Ray reaches: the nodes it has, or may grow to, and the address it joined ("" for a Ray this
    process started itself)."""

    nodes: float  # math.inf for an autoscaler without a node limit
    address: str = ""


def cluster_span(runtime: RuntimeConfig) -> ClusterSpan:
    """Join the cluster when the job was pointed at one (RAY_ADDRESS, or a Ray already initialised, as tests do) and
    count its nodes; a Ray started here by init_ray is this machine alone, and is not started for the count."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not ray.is_initialized() and not address:
        return ClusterSpan(1)
    init_ray(runtime)
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterSpan(max(alive, most_nodes()), address)


def most_nodes() -> float:
    """The node count the autoscaler may grow the cluster to (a cluster that starts with its head alone and adds
    GPU workers for the stages is a multi-node cluster from the first stage on); 0 when no autoscaler published
    its node groups, math.inf when a group has no limit. Ray Train reads the same record for its own bounds."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except (ImportError, AttributeError):  # a private API: a Ray without it only loses this estimate
        return 0
    if config is None:
        return 0
    counts = [group.max_count for group in config.node_group_configs]
    return math.inf if any(count < 0 for count in counts) else sum(counts)


# The Ray node ids whose actors or tasks did a stage's work, gathered by the driver from the rows and summaries the
# workers send back (engine/ray/encode.py, quantize.py; the decode stage's rows carry their node themselves),
# until the stage's record takes them.
_NODES_SEEN: dict[str, set[str]] = {}


def node_id() -> str:
    """The Ray node this actor or task runs on (hex)."""
    return ray.get_runtime_context().get_node_id()


def saw_nodes(stage: str, ids) -> None:
    """Called once per stage run, when its work is done: replaces what an earlier, failed attempt left."""
    _NODES_SEEN[stage] = {str(i) for i in ids}


def take_nodes(stage: str) -> tuple[str, ...]:
    """The node ids seen doing `stage`'s work since the last take, sorted."""
    return tuple(sorted(_NODES_SEEN.pop(stage, set())))
