"""A stand-in for the node recycler's deployment handle, for replicas built in-process: it records the calls."""

from __future__ import annotations


class _Remote:
    """Stands in for a method of the recycler's handle (another deployment): records calls."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    async def remote(self, *args):
        self.calls.append((self.name, args))
        return (False, "")


class RecyclerHandle:
    def __init__(self) -> None:
        self.calls: list = []
        for name in ("report_failure", "heartbeat", "forget_replica"):
            setattr(self, name, _Remote(self.calls, name))

    def named(self, name: str) -> list:
        """The arguments of every call of the method `name`, in order."""
        return [args for called, args in self.calls if called == name]


# The node recycler itself, built as Serve builds it, on one node the tests name; Ray's drain as a script.
NODE, IP = "abc123", "10.1.2.3"


async def started_recycler(settings, drain=None):
    """A NodeRecycler over the one node NODE, its loop stopped: the test drives its ticks."""
    from embedding_service.fleet.recycler import NodeRecycler

    recycler = NodeRecycler.__new__(NodeRecycler)
    kwargs = {"drain": drain} if drain else {}
    await recycler.__init__(settings, alive_nodes=lambda: {NODE: IP}, **kwargs)  # Serve awaits it the same way
    recycler._loop.cancel()
    return recycler


async def quarantine(recycler) -> None:
    await recycler.cycle()  # the node is tracked
    await recycler.report_failure("r1", NODE, "CUDA error: it's broken")


def node_view(recycler):
    return next(n for n in recycler.book.snapshot().nodes if n.node_id == NODE)


class ScriptedDrains:
    """Ray's drain as a script: each call answers (or raises) the next of `answers`."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, node_id: str, message: str, deadline_s: float):
        self.calls.append((node_id, message, deadline_s))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
