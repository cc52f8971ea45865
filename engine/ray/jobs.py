"""The evaluate stage's student jobs and their scheduling, on the driver: `StudentJob` (one student architecture on
one set, or `full`, with one seed), how many trainers run side by side (the cluster's resources, read from
engine.ray.cluster.stage_resources), and the split of the jobs among them. Ray is imported only inside the
functions that ask the cluster, so engine/pipeline.py builds jobs without starting or importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import DistillConfig


@dataclass(frozen=True)
class StudentJob:
    """One student to train; a result row names it by `identity()`."""

    name: str  # the result file's stem, e.g. ddoq-mass-ipc10-convnet3-seed0
    set_name: str  # e.g. ddoq-mass-ipc10: a trainer runs the jobs of one set back to back
    method: str
    weights: str
    ipc: int
    seed: int
    student: str  # the architecture
    teacher: str  # the teacher's architecture, "none" when the protocol uses no teacher
    protocol: str
    set_dir: str  # the distilled set's folder; "" for `full`, which streams the train split
    draw: int = 0  # which random subset `random` trains on (engine/evaluate/sets.py); 0 for every other set
    learning_rate: float = 0.0  # 0: the protocol's; else a rate of evaluate.learning_rates

    def protocol_rate(self) -> float:
        """The learning rate this job trains at."""
        from engine.evaluate.protocols import get_protocol

        return self.learning_rate or get_protocol(self.protocol).learning_rate

    def identity(self) -> dict:
        """The fields a result row carries, in the row's order."""
        return {"method": self.method, "weights": self.weights, "ipc": self.ipc, "protocol": self.protocol,
                "student": self.student, "teacher": self.teacher, "seed": self.seed, "draw": self.draw,
                "learning_rate": self.protocol_rate()}


def job_cost(config: DistillConfig, job: StudentJob, train_rows: int) -> int:
    """Training steps of a job (its relative cost): the set's size x epochs in batches."""
    from engine.data.sources import class_names
    from engine.evaluate.protocols import student_batch_size
    from engine.evaluate.train import epochs_to_steps, student_epochs

    e = config.evaluate
    if job.method == "full":
        return epochs_to_steps(train_rows, e.full_epochs, e.batch_size)
    classes = len(class_names(config.data))
    return epochs_to_steps(job.ipc * classes, student_epochs(e), student_batch_size(e, job.ipc, classes))


def share_jobs(config: DistillConfig, jobs: list[StudentJob], trainers: int,
               train_rows: int) -> list[list[StudentJob]]:
    """Longest job first onto the least loaded trainer (balanced finish times); within a trainer, jobs of one
    set back to back (the set is read once)."""
    shares: list[list[StudentJob]] = [[] for _ in range(trainers)]
    loads = [0] * trainers
    for job in sorted(jobs, key=lambda j: -job_cost(config, j, train_rows)):
        least = loads.index(min(loads))
        shares[least].append(job)
        loads[least] += job_cost(config, job, train_rows)
    order = {job.name: i for i, job in enumerate(jobs)}
    return [sorted(share, key=lambda j: (j.set_name, order[j.name])) for share in shares if share]


def trainer_count(config: DistillConfig, jobs: int, streams: bool) -> int:
    """How many trainers run side by side: the config's, or as many as the cluster's GPUs or CPUs hold at its
    largest (an autoscaling cluster counts the nodes it may add, not those alive when the stage starts: at zero
    GPU workers that was one trainer for 54 jobs), leaving the stream's Ray Data tasks their CPU, never more than
    the jobs. A count that cannot fit on a fixed one-node Ray is refused: the trainers would wait for each other's
    CPUs and the stream's tasks would never run."""
    import ray

    from engine.config import RunError
    from engine.ray.cluster import cluster_capacity, stage_resources

    runtime = config.runtime
    capacity = cluster_capacity()
    stages = stage_resources(config)
    fits = stages.trainers_fitting(capacity.cpus, capacity.gpus, streams)
    count = runtime.concurrent_trainers or max(1, fits)
    one_node = not capacity.autoscaled and len([n for n in ray.nodes() if n.get("Alive")]) == 1
    if one_node and count > max(fits, 0):
        spare = stages.stream_cpus if streams else 0.0
        raise RunError(f"{count} trainer(s) x {runtime.train_workers} worker(s) x {runtime.train_cpus_per_worker:g} "
                       f"CPU (+{spare:g} for the data stream) do not fit in {capacity.cpus:g} CPUs: lower "
                       f"runtime.concurrent_trainers or runtime.train_cpus_per_worker (a fraction is fine: "
                       f"runtime.train_threads_per_worker sets the threads)")
    return max(1, min(count, jobs))


def teacher_threads(config: DistillConfig) -> int:
    """The teacher trains alone before the students: its worker takes the threads of the trainers its node would
    hold (all of a one-node Ray's, as before), never those of nodes an autoscaler may add."""
    from engine.ray.cluster import largest_node, stage_resources

    runtime = config.runtime
    node = largest_node()
    fits = max(1, stage_resources(config).trainers_fitting(node.get("CPU", 0.0), node.get("GPU", 0.0), streams=True))
    return runtime.threads("train") * min(runtime.concurrent_trainers or fits, fits)


def capacity_words() -> str:
    """Where the trainer count came from, for the log."""
    from engine.ray.cluster import cluster_capacity

    capacity = cluster_capacity()
    where = "the autoscaler's largest cluster" if capacity.autoscaled else "alive now"
    return f"{capacity.gpus:g} GPU(s), {capacity.cpus:g} CPU(s) {where}"
