"""A gateway's streams (its *lanes*): requests sent and answers matched to them by seq, the server's events, and
what each session keeps for a resume. No I/O (see ``cellserve.client.gateway_ops``).

The server answers a stream's requests one at a time, in order; ``seq`` 0 marks its own events. Per session
the lanes keep what a single session's core keeps (``cellserve.client.core``): the base token (from a
checkpoint step, ``snapshot`` or ``draining``) and the inputs answered since. A stream that ends without
closing its sessions (UNAVAILABLE, a reset, an OK end), or whose server closes them for its drain, is marked
broken; its sessions resume on their next use (``cellserve.client.gateway_resume``). A ``draining`` notice
marks it to move at once when there is another target. An idle close makes its session's key fail, alone.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence

from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    ResourceExhaustedError,
    UnavailableError,
    UnknownError,
    log_lost,
)
from cellserve.client.gateway_columns import SERVER_MAX_MESSAGE_BYTES, rows_per_message
from cellserve.client.gateway_errors import entry_error, request_error
from cellserve.client.gateway_ops import (
    Ended,
    EndLane,
    GatewayRoutine,
    Lane,
    Member,
    Outcome,
    Pending,
    PollOn,
    SendOn,
    StartLane,
)
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import SessionPolicy
from cellserve.client.replies import CLOSE_REASONS, closed_error
from cellserve.client.tensors import to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb

log = logging.getLogger(__name__)


class Lanes:
    """The gateway's sessions by key, its streams, and every decision about them that is not a call's own."""

    def __init__(
        self,
        targets: tuple[str, ...],
        policy: SessionPolicy,
        *,
        model: str = "",
        open_timeout_s: float = 5.0,
        max_message_bytes: int = SERVER_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = targets
        self.policy = policy
        self.model = model  # as asked; the server's name for it once a session is open
        self.info: ModelInfo | None = None  # the model's description, once a session is open
        self.open_timeout_s = open_timeout_s
        self.max_message_bytes = max_message_bytes
        self.members: dict[str, Member] = {}
        self.lanes: list[Lane] = []
        self._clock = clock
        self._ids = itertools.count(1)

    # -- requests and answers ---------------------------------------------------------------------

    def _new_lane(self, index: int) -> GatewayRoutine[Lane]:
        lane = Lane(next(self._ids), index, self._clock())
        yield StartLane(lane.id, self.targets[index])
        return lane

    def _transmit(self, lane: Lane, pendings: Sequence[Pending]) -> GatewayRoutine[None]:
        """Record ``pendings`` as awaiting answers on ``lane``, then send them in order (none on a broken lane:
        its resume sends them). A call interrupted between the two leaves the lane broken, hence resumed."""
        lane.inflight.extend(pendings)
        sent = 0
        try:
            for p in pendings:
                if lane.broken:
                    break
                yield SendOn(lane.id, self._request(p))
                sent += 1
        finally:
            if sent < len(pendings) and not lane.broken:
                self._break(lane, "a call was interrupted before all its requests were sent")

    def _request(self, p: Pending) -> pb.MultiplexRequest:
        handles = [m.handle for m in p.members]
        if p.kind == "open":
            opens = [pb.SessionOpen(model=self.model, resume_token=m.token, idle_timeout_s=m.idle_timeout_s, key=m.key)
                     for m in p.members]  # fmt: skip
            return pb.MultiplexRequest(seq=p.seq, open=pb.OpenSessions(sessions=opens))
        if p.kind == "snapshot":
            return pb.MultiplexRequest(seq=p.seq, snapshot=pb.SnapshotSessions(handles=handles))
        if p.kind == "close":
            return pb.MultiplexRequest(seq=p.seq, close=pb.CloseSessions(handles=handles))
        assert p.xs is not None
        step = pb.StepSessions(handles=handles, input=to_proto(p.xs), checkpoint=p.checkpoint)
        return pb.MultiplexRequest(seq=p.seq, step=step)

    def _settle(self) -> GatewayRoutine[None]:
        """Take in what every stream has already received (answers nobody waited for, the server's events)."""
        for lane in list(self.lanes):
            while not lane.broken:
                reply = yield PollOn(lane.id)
                if reply is None:
                    break
                self._on_reply(lane, reply)
            if lane.broken and not self._movers(lane) and not lane.inflight:
                yield EndLane(lane.id)
                self._retire(lane, None)

    def _on_reply(self, lane: Lane, reply: object) -> None:
        if isinstance(reply, Ended):
            self._on_end(lane, reply.error)
            return
        assert isinstance(reply, pb.MultiplexResponse), reply
        if reply.seq == 0:
            self._on_event(lane, reply)
            return
        p = lane.inflight[0] if lane.inflight else None
        if p is None or p.seq != reply.seq:
            want = "none" if p is None else str(p.seq)
            self._break(lane, f"answered seq {reply.seq}; the next request awaiting an answer is {want}")
            return
        lane.inflight.popleft()
        if p.kind == "open":
            self._adopt_opens(lane, p.members, reply, p.outcome)
        elif p.kind == "snapshot":
            self._answer_snapshot(p, reply)
        elif p.kind == "close":
            self._orphan(p, None)
        else:
            self._answer_step(lane, p, reply)
        p.done = True

    def _on_end(self, lane: Lane, error: CellserveClientError | None) -> None:
        if error is not None and not isinstance(error, UnavailableError):
            for m in self._movers(lane):  # a status no resume helps with (UNAUTHENTICATED, INTERNAL, ...)
                self._lose(m, error)
        how = f" ({error.details})" if error else " without closing its sessions"
        self._break(lane, f"{self.targets[lane.target]} ended the stream{how}")

    def _on_event(self, lane: Lane, resp: pb.MultiplexResponse) -> None:
        kind = resp.WhichOneof("kind")
        where = self.targets[lane.target]
        if kind == "draining":
            d = resp.draining
            for handle, token in zip(d.handles, d.resume_tokens, strict=False):
                m = lane.members.get(handle)
                if m is not None and token:
                    self._absorb(m, token)
            lane.draining = True
            if d.deadline_unix_ms == 0:  # the drain closed them: these tokens hold their final state
                self._break(lane, f"{where} closed the sessions for its drain")
            else:
                lane.move_wanted = len(self.targets) > 1
        elif kind == "closed":
            c = resp.closed
            reason = CLOSE_REASONS.get(c.reason, "unspecified")
            if reason == "drain":
                self._break(lane, f"{where} closed the sessions for its drain")
                return
            for handle in c.handles:
                m = lane.members.get(handle)
                if m is not None and not m.closing:
                    self._lose(m, closed_error(m.session_id, reason, c.message))
        else:
            self._break(lane, f"{where} sent an event {kind!r}; expected draining or closed")

    def _adopt_opens(
        self, lane: Lane, members: list[Member], resp: pb.MultiplexResponse, outcome: Outcome | None
    ) -> int:
        """Place the sessions an open answer opened on ``lane``; the others' errors go to ``outcome``."""
        outcome = outcome or Outcome()
        kind = resp.WhichOneof("kind")
        if kind != "opened" or len(resp.opened.sessions) != len(members):
            error = request_error(resp.error, step=False) if kind == "error" else UnknownError(
                f"the server answered an open of {len(members)} sessions with {kind!r}")  # fmt: skip
            outcome.errors.update((m.key, error) for m in members)
            return 0
        errors = {e.index: e for e in resp.errors}
        for i, (m, o) in enumerate(zip(members, resp.opened.sessions, strict=True)):
            if i in errors:
                error = entry_error(errors[i])
                if isinstance(error, UnavailableError):  # its server began a drain: another may take it
                    outcome.retry.append((m, error))
                    lane.draining = True  # no more opens here (its drain notice may still be on its way)
                elif isinstance(error, ResourceExhaustedError):  # no room: the stream's limit, or the server's
                    outcome.retry.append((m, error))
                    lane.full = True  # a new stream is tried (until a session of this one closes)
                else:
                    outcome.errors[m.key] = error
                continue
            self._place(lane, m, o)
            m.steps = m.base_steps = o.steps
            m.model_sha256 = o.model_sha256
            self.model = self.model or o.model
            self.members[m.key] = m  # replaces a session of that key that could not go on
            outcome.values[m.key] = None
        return len(members) - len(errors)

    def _answer_step(self, lane: Lane, p: Pending, resp: pb.MultiplexResponse) -> None:
        kind = resp.WhichOneof("kind")
        assert p.xs is not None
        replay = p.kind == "replay"
        if replay and not any(q.kind == "replay" for q in lane.inflight):
            lane.recovery = None  # the replay is answered (its refused rows' sessions lost): the episode is over
        if kind != "output":
            error = request_error(resp.error, step=True) if kind == "error" else UnknownError(
                f"the server answered a step with {kind!r}")  # fmt: skip
            for m in p.members:
                self._step_failed(lane, p, m, error)
            return
        y = to_numpy(resp.output.output)  # [n, T, *out]
        tokens = resp.output.resume_tokens
        errors = {e.index: e for e in resp.errors}
        t = int(p.xs.shape[1])
        for i, m in enumerate(p.members):
            if i in errors or m.error is not None or m.lane is not lane:
                self._step_failed(lane, p, m, entry_error(errors[i], step=p.seq) if i in errors else None)
                continue
            m.stream_steps += t
            if replay:
                m.here += 1
            else:
                m.steps += t
                if self.policy.checkpoint_every > 0:
                    m.since.append(p.xs[i])
                    m.here += 1
                else:
                    m.gap += t
                if p.outcome is not None and p.outcome.keyed:
                    p.outcome.values[m.key] = y[i]
            if i < len(tokens) and tokens[i]:
                self._absorb(m, tokens[i])
        if p.outcome is not None and not replay:
            p.outcome.blocks.append(([m.key for m in p.members], y))
        if p.checkpoint:
            lane.checkpoint_at = self._clock()

    def _step_failed(self, lane: Lane, p: Pending, m: Member, error: CellserveClientError | None) -> None:
        error = m.error or error or UnavailableError(f"session {m.key!r} left its stream before the step was answered")
        if p.kind == "replay" and m.error is None:  # its state on this server is not the one the caller saw
            where = self.targets[lane.target]
            self._lose(m, DataLossError(f"{where} refused a replayed step of session {m.key!r} ({error.details})"))
        elif p.outcome is not None:
            p.outcome.errors[m.key] = error

    def _answer_snapshot(self, p: Pending, resp: pb.MultiplexResponse) -> None:
        assert p.outcome is not None
        if resp.WhichOneof("kind") != "snapshot":
            error = request_error(resp.error, step=False) if resp.WhichOneof("kind") == "error" else UnknownError(
                f"the server answered a snapshot with {resp.WhichOneof('kind')!r}")  # fmt: skip
            p.outcome.errors.update((m.key, m.error or error) for m in p.members)
            return
        s = resp.snapshot
        errors = {e.index: e for e in resp.errors}
        for i, m in enumerate(p.members):
            token = s.tokens[i] if i < len(s.tokens) else b""
            if i in errors or not token or m.error is not None:
                lost = entry_error(errors[i]) if i in errors else UnknownError("the snapshot returned no token")
                p.outcome.errors[m.key] = m.error or lost
                continue
            self._absorb(m, token, int(s.steps[i]) if i < len(s.steps) else None)
            p.outcome.values[m.key] = token

    # -- session records --------------------------------------------------------------------------

    def _place(self, lane: Lane, m: Member, o: pb.OpenedSession) -> None:
        """``m`` is the session ``o`` opened on ``lane`` (its state: the base; the inputs since not replayed yet)."""
        m.lane, m.handle, m.session_id, m.stream_steps, m.here = lane, o.handle, o.session_id, o.steps, 0
        lane.members[o.handle] = m

    def _absorb(self, m: Member, token: bytes, steps: int | None = None) -> None:
        """A token of ``m``'s state after every answer received before it: the new base."""
        m.token, m.base_steps = token, m.stream_steps if steps is None else steps
        del m.since[: m.here]
        m.here = m.gap = 0

    def _detach(self, m: Member) -> None:
        """``m`` leaves its stream (which has room again); its key stays, for its error or a resume."""
        if m.lane is not None and m.lane.members.get(m.handle) is m:
            del m.lane.members[m.handle]
            m.lane.full = False
        m.lane = None

    def _forget(self, m: Member) -> None:
        """``m`` is closed: its key is gone from the gateway."""
        self._detach(m)
        if self.members.get(m.key) is m:
            del self.members[m.key]

    def _lose(self, m: Member, error: CellserveClientError) -> None:
        """``m`` cannot go on: its key fails with ``error`` from now on; logged once, the key and the reason in
        the text and as fields (an idle expiry is ordinary: INFO)."""
        self._detach(m)
        m.since.clear()
        if m.error is not None:
            return
        m.error = error
        log_lost(log, f"gateway session {m.key!r} ({m.session_id})", m.session_id, error, key=m.key)

    def _movers(self, lane: Lane) -> list[Member]:
        """The sessions of ``lane`` that go with it when it moves or resumes."""
        return [m for m in lane.members.values() if m.error is None and not m.closing]

    def _rows_per_message(self, steps: int) -> int:
        if self.info is None:
            return 1 << 30
        return rows_per_message(self.info, steps, self.max_message_bytes)

    def _orphan(self, p: Pending, error: CellserveClientError | None) -> None:
        """A request whose stream is gone and that is not sent again: a close is done, an open is tried again,
        a step's or snapshot's keys fail (with ``error``, or why their session cannot go on)."""
        p.done = True
        if p.kind == "close":
            for m in p.members:
                self._forget(m)
                if p.outcome is not None:
                    p.outcome.values[m.key] = None
        elif p.kind == "open" and p.outcome is not None:
            broke = UnavailableError("its stream ended before the open was answered")
            p.outcome.retry.extend((m, broke) for m in p.members)
        elif p.kind in ("step", "snapshot") and p.outcome is not None:
            why = error or UnavailableError("its stream ended before the request was answered")
            p.outcome.errors.update((m.key, m.error or why) for m in p.members)

    def _retire(self, lane: Lane, error: CellserveClientError | None) -> None:
        """Forget a stream for good: its requests are orphans, its remaining sessions (closing) are closed."""
        for p in lane.inflight:
            self._orphan(p, error)
        lane.inflight.clear()
        for m in list(lane.members.values()):
            self._forget(m) if m.closing else self._lose(m, error or UnavailableError("its stream is gone"))
        if lane in self.lanes:
            self.lanes.remove(lane)

    def _break(self, lane: Lane, why: str) -> None:
        if lane.broken:
            return
        lane.broken, lane.move_wanted = why, False
        if self._movers(lane):
            where = {"target": self.targets[lane.target], "sessions": len(lane.members), "why": why}
            log.info("gateway stream lost its server; its sessions resume", extra=where)
