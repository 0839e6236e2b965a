"""Server 0's handle on every server of the job: its own server directly, the others through
the protocol's endpoints.

The coordinator uses it for the log's counters, the consistent cut, the stop, the liveness
pings of the other servers and the end of the job. A server that does not answer within
``ps.rpc_timeout`` raises PeerLost (the job cannot go on without its parameters).
"""

from __future__ import annotations

from mlc.train.async_ps import protocol
from mlc.train.async_ps.protocol import PeerLost


class ServerGroup:
    def __init__(self, servers: int, rpc_timeout: float):
        self.names = [f"server{s}" for s in range(servers)]
        self.rpc_timeout = rpc_timeout

    def call(self, s: int, endpoint, *args, timeout: float | None = None):
        """endpoint on server s. Server 0 is this process: its Server's method of the same name
        (the coordinator has made it ready before it calls), without RPC."""
        if s == 0:
            return getattr(protocol.SERVER, endpoint.__name__)(*args)
        timeout = self.rpc_timeout if timeout is None else timeout
        try:
            return protocol.call(self.names[s], endpoint, *args, timeout=timeout)
        except RuntimeError as e:
            raise PeerLost(f"server {s} does not answer ({e})") from None

    def each(self, endpoint, *args) -> list:
        """endpoint on every server, in order; their answers."""
        return [self.call(s, endpoint, *args) for s in range(len(self.names))]

    def cut(self) -> list[dict]:
        """Every server's snapshot, taken as one consistent cut: every server is paused (a
        pause waits for the update in progress), each hands over a copy of its state, all go
        on. A server that was paused is resumed even if a later one fails."""
        paused = []
        try:
            for s in range(len(self.names)):
                self.call(s, protocol.pause)
                paused.append(s)
            return self.each(protocol.snapshot)
        finally:
            for s in paused:
                self.call(s, protocol.resume)

    def stop(self, say) -> None:
        """Every server answers later pushes with "stop"; one that is gone gets a warning."""
        for s in range(len(self.names)):
            try:
                self.call(s, protocol.set_stop)
            except PeerLost as e:
                say(f"warning: {e}")

    def ping_others(self) -> None:
        """PeerLost unless every other server answers."""
        for s in range(1, len(self.names)):
            self.call(s, protocol.ping, timeout=min(10.0, self.rpc_timeout))

    def finish_others(self, workers: list[str], together: bool) -> bool:
        """Tell the other servers and the ``workers`` (RPC names) that the job is over, all at
        once; each leaves the RPC group and exits (``together``: all processes at once). True
        if every one of them answered; one that does not is passed over."""
        timeout = min(10.0, self.rpc_timeout)
        futures = [
            protocol.send(name, protocol.finish, together, timeout=timeout)
            for name in [*self.names[1:], *workers]
        ]
        answered = True
        for future in futures:
            try:
                future.wait()
            except RuntimeError:
                answered = False
        return answered
