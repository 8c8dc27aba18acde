"""The batch jobs' one touch of Ray Data's non-public API, fenced: releasing the resource reservation of a job's
runner that was killed.

Ray Data's AutoscalingCoordinator (one detached actor per cluster) tracks a request from each running dataset. The
requester id is `data-<dataset id>`, and the dataset id starts with the dataset's name. The coordinator gives each
requester the bundles it asked for, then splits each node's leftover CPUs evenly between the requesters, rounding
down. A dataset's executor cancels its request when it shuts down. A runner that is killed (cancel, expiry, its
node or the manager lost) never shuts down, so its request stays until it expires
(RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S, 180 s by default). Seen here: two killed runners' requests left the
next job's write tasks no CPU until its model actor had embedded every row. So the manager releases a runner's
requests once the runner is gone, before another runner of that job starts.

The shape of what this uses is checked when this module is imported, in the manager's process. A Ray release
that moved it then stops the manager at start, naming the Ray version and what moved. Tested against the installed
Ray (tests/unit/test_ray_internals.py); the requirements pin Ray's minor release.
"""

from __future__ import annotations

import inspect

import ray
from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as _coordinator
from ray.data._internal.cluster_autoscaler import rate_based_cluster_autoscaler as _rate_based

COORDINATOR_NAME = COORDINATOR_NAMESPACE = "AutoscalingCoordinator"
_REQUESTER = 'f"data-{execution_id}"'


class RayDataInternalsChanged(RuntimeError):
    """A non-public Ray Data API the jobs rely on is not where, or not what, it was."""


def _check() -> None:
    where = f"Ray {ray.__version__}"
    actor = getattr(_coordinator, "_AutoscalingCoordinatorActor", None)
    cancel = getattr(actor, "cancel_request", None)
    if actor is None or cancel is None:
        raise RayDataInternalsChanged(f"{where}: ray.data's _AutoscalingCoordinatorActor.cancel_request is gone")
    if tuple(inspect.signature(cancel).parameters) != ("self", "requester_id"):
        raise RayDataInternalsChanged(f"{where}: _AutoscalingCoordinatorActor.cancel_request takes "
                                      f"{tuple(inspect.signature(cancel).parameters)}, not (requester_id)")
    if "self._ongoing_reqs" not in inspect.getsource(actor.__init__):
        raise RayDataInternalsChanged(f"{where}: _AutoscalingCoordinatorActor keeps no _ongoing_reqs")
    creator = inspect.getsource(_coordinator.get_or_create_autoscaling_coordinator)
    if f'name="{COORDINATOR_NAME}"' not in creator or f'namespace="{COORDINATOR_NAMESPACE}"' not in creator:
        raise RayDataInternalsChanged(f"{where}: the AutoscalingCoordinator actor has another name or namespace")
    if _REQUESTER not in inspect.getsource(_rate_based.RateBasedClusterAutoscaler.__init__):
        raise RayDataInternalsChanged(f"{where}: a dataset's requester id is no longer {_REQUESTER}")


_check()


def _coordinator_actor():
    try:
        return ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE)
    except ValueError:  # no dataset ran on this cluster yet: nothing is reserved
        return None


def requests_of(dataset_name: str, timeout_s: float = 10.0) -> list[str]:
    """The requester ids the coordinator holds for the executions of the dataset named `dataset_name`."""
    actor = _coordinator_actor()
    if actor is None:
        return []
    prefix = f"data-{dataset_name}_"
    return ray.get(actor.__ray_call__.remote(
        lambda coordinator: [r for r in list(coordinator._ongoing_reqs) if r.startswith(prefix)]), timeout=timeout_s)


def release_requests(dataset_name: str, timeout_s: float = 10.0) -> list[str]:
    """Cancels the coordinator's requests for the executions of the dataset named `dataset_name` (whose driver is
    gone); the requester ids released."""
    actor = _coordinator_actor()
    if actor is None:
        return []
    prefix = f"data-{dataset_name}_"

    def release(coordinator) -> list[str]:  # runs in the coordinator's process
        ids = [r for r in list(coordinator._ongoing_reqs) if r.startswith(prefix)]
        for requester_id in ids:
            coordinator.cancel_request(requester_id)
        return ids

    return ray.get(actor.__ray_call__.remote(release), timeout=timeout_s)
