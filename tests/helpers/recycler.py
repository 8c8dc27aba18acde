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
