"""The gateway core: every decision of a gateway's calls (open, step, snapshot, close), and no I/O.

Each call is a routine over the operations of ``cellserve.client.gateway_ops``, performed by the sync
``Gateway`` or the ``AsyncGateway``; the streams themselves (answers, events, resumes) are
``cellserve.client.gateway_lanes``. A call returns its result for every key, or raises ``GatewayError``
carrying the failed keys' errors and the others' results: one bad session never costs the others theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from cellserve.client.errors import (
    AlreadyExistsError,
    CellserveClientError,
    FailedPreconditionError,
    InvalidInputError,
    UnavailableError,
)
from cellserve.client.gateway_columns import SERVER_MAX_MESSAGE_BYTES, assemble, check_columns
from cellserve.client.gateway_errors import GatewayError
from cellserve.client.gateway_ops import (
    DEFAULT_SESSIONS_PER_STREAM,
    Describe,
    EndLane,
    GatewayRoutine,
    GatewaySession,
    Lane,
    Member,
    Outcome,
    Pending,
    ReceiveOn,
    SendOn,
)
from cellserve.client.gateway_resume import ResumingLanes
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import Ended, SessionPolicy
from cellserve.client.recovery import candidates
from cellserve.v1 import cellserve_pb2 as pb

OPEN_ROUNDS = 3  # opens that go elsewhere (a stream broke, drains, is full) stop after this many rounds opening none


class GatewayCore(ResumingLanes):
    """Client-side record and decisions of a gateway: many sessions of one model, named by the caller's keys."""

    def __init__(
        self,
        targets: tuple[str, ...],
        policy: SessionPolicy,
        *,
        model: str = "",
        idle_timeout_s: int = 0,
        sessions_per_stream: int = DEFAULT_SESSIONS_PER_STREAM,
        streams: int = 1,
        open_timeout_s: float = 5.0,
        max_message_bytes: int = SERVER_MAX_MESSAGE_BYTES,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sessions_per_stream < 1 or streams < 1:
            raise ValueError(f"sessions_per_stream={sessions_per_stream}, streams={streams}; use 1 or more of each")
        super().__init__(
            targets, policy, model=model, open_timeout_s=open_timeout_s, max_message_bytes=max_message_bytes,
            clock=clock,
        )  # fmt: skip
        self.idle_timeout_s = idle_timeout_s  # as asked (ops.whole_seconds), for every session it opens
        self.sessions_per_stream = sessions_per_stream
        self.streams = streams
        self.preferred = start  # where new streams go first: the last target that took one
        self.closed = False

    # -- what the shells show ---------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        """The keys of the sessions that can be stepped (open, and not lost), in the order they were opened. Read
        from a copy: another thread's call may change them meanwhile."""
        return [key for key, m in list(self.members.items()) if m.error is None]

    def session(self, key: str) -> GatewaySession:
        m = self._member(key)
        target = self.targets[m.lane.target] if m.lane is not None else ""
        return GatewaySession(key, m.session_id, target, m.steps, m.token, m.error)

    def open_streams(self) -> list[str]:
        """The target of each stream the gateway holds (a stream whose server is gone included)."""
        return [self.targets[lane.target] for lane in self.lanes]

    # -- calls ------------------------------------------------------------------------------------

    def open(self, keys: Iterable[str], tokens: Mapping[str, bytes]) -> GatewayRoutine[list[str]]:
        """Open a session per key (from ``tokens[key]`` if given, else zero state); returns the keys opened."""
        self._check_usable()
        keys = self._distinct(keys)
        outcome = Outcome()
        yield from self._settle()  # an idle close not yet taken in: its key may be opened again
        fresh = []
        for key in keys:
            old = self.members.get(key)
            if old is not None and old.error is None:
                outcome.errors[key] = AlreadyExistsError(f"session {key!r} is already open in this gateway")
            else:
                fresh.append(Member(key, self.idle_timeout_s, token=tokens.get(key, b"")))
        idle_rounds = 0  # rounds in a row that opened nothing
        refused: list[tuple[Member, CellserveClientError]] = []  # the last round's, to try elsewhere, and why
        while fresh and idle_rounds < OPEN_ROUNDS:  # a stream that broke, drains or is full: the rest go elsewhere
            opened = len(outcome.values)
            yield from self._open_round(fresh, outcome)
            idle_rounds = 0 if len(outcome.values) > opened else idle_rounds + 1
            refused, outcome.retry = outcome.retry, []
            fresh = [Member(m.key, self.idle_timeout_s, token=m.token) for m, _ in refused]
        outcome.errors.update((m.key, error) for m, error in refused)  # none left if the last round took them all
        return self._finish(outcome, keys, [key for key in keys if key in outcome.values])

    def step(self, inputs: Mapping[str, object]) -> GatewayRoutine[dict[str, np.ndarray]]:
        """One step per key: ``inputs[key]`` is [T, *frame] (or one step without T); returns {key: [T, *out]}."""
        self._check_usable()
        yield from self._describe()
        outcome = Outcome()
        by_shape: dict[tuple, tuple[list[Member], list[np.ndarray]]] = {}
        for key, x in inputs.items():
            m = self._member(key)
            if m.error is not None:
                outcome.errors[key] = m.error
                continue
            assert self.info is not None  # known once a session is open
            try:
                row = self.info.check_input(x)
            except InvalidInputError as e:
                outcome.errors[key] = e
                continue
            members, rows = by_shape.setdefault(row.shape, ([], []))
            members.append(m)
            rows.append(row)
        blocks = [(members, np.stack(rows)) for members, rows in by_shape.values()]  # a copy: kept for a replay
        yield from self._step_blocks(blocks, outcome)
        return self._finish(outcome, list(inputs), {k: outcome.values[k] for k in inputs if k in outcome.values})

    def step_arrays(self, keys: Sequence[str], x: object) -> GatewayRoutine[np.ndarray]:
        """One step per key, columnar: ``x`` is [N, T, *frame] (row i for keys[i]); returns [N, T, *out]."""
        self._check_usable()
        keys = self._distinct(keys)
        members = [self._member(key) for key in keys]
        yield from self._describe()
        if self.info is None:  # no session was ever open, so no key is given: nothing to say what a row holds
            return np.zeros((0, *np.shape(x)[1:2]), np.float32)
        a, bad = check_columns(self.info, x, len(keys))  # no keys: x is [0, T, *frame], the answer [0, T, *out]
        outcome = Outcome(keyed=False)
        outcome.errors.update((keys[i], e) for i, e in bad.items())
        outcome.errors.update((m.key, m.error) for m in members if m.error is not None and m.key not in bad)
        rows = [i for i, m in enumerate(members) if m.key not in outcome.errors]
        if rows:
            block = a if len(rows) == len(keys) else a[rows]
            yield from self._step_blocks([([members[i] for i in rows], block)], outcome)
        out = tuple(d if d > 0 else 0 for d in self.info.output_frame or ())
        y = assemble(keys, outcome.blocks, outcome.errors, (len(keys), a.shape[1], *out))
        return self._finish(outcome, keys, y)

    def snapshot(self, keys: Iterable[str] | None) -> GatewayRoutine[dict[str, bytes]]:
        """An exact resume token of each key's state now (it becomes the session's base)."""
        self._check_usable()
        keys = self.keys if keys is None else self._distinct(keys)
        outcome = Outcome()
        yield from self._settle()
        members = []
        for key in keys:
            m = self._member(key)
            if m.error is not None:
                outcome.errors[key] = m.error
            else:
                members.append(m)
        yield from self._per_lane("snapshot", members, outcome)
        return self._finish(outcome, keys, {k: outcome.values[k] for k in keys if k in outcome.values})

    def close(self, keys: Iterable[str] | None) -> GatewayRoutine[None]:
        """Close these sessions (None: every one); unknown keys are ignored: closing is idempotent. Never resumes a
        session just to close it."""
        if self.closed:
            return
        keys = list(self.members) if keys is None else self._distinct(keys)
        yield from self._settle()
        members = []
        for key in keys:
            m = self.members.get(key)
            if m is None:
                continue
            if m.error is not None or m.lane is None or m.lane.broken:
                self._forget(m)
            else:
                m.closing = True
                members.append(m)
        yield from self._per_lane("close", members, Outcome())

    def shutdown(self) -> GatewayRoutine[None]:
        """Close every session, then half-close every stream (the servers end them). Idempotent."""
        if self.closed:
            return
        yield from self.close(None)
        self.closed = True
        for lane in self.lanes:
            yield EndLane(lane.id, graceful=not lane.broken)
        self.lanes.clear()

    # -- opening ----------------------------------------------------------------------------------

    def _open_round(self, fresh: list[Member], outcome: Outcome) -> GatewayRoutine[None]:
        yield from self._settle()  # drain notices and broken streams first: opens go elsewhere
        pendings = []
        plan = self._plan(fresh)
        for lane, group in plan:
            if lane is not None:
                p = Pending("open", lane, lane.seq(), group, outcome=outcome)
                pendings.append(p)
                yield from self._transmit(lane, [p])
        for lane, group in plan:
            if lane is None:
                yield from self._open_stream(group, outcome)
        for p in pendings:
            yield from self._wait(p)
        yield from self._describe()

    def _describe(self) -> GatewayRoutine[None]:
        """Learn the model's description once a session is open (its input check, its output's shape)."""
        if self.info is None and self.lanes:
            info = yield Describe(self.model, self.targets[self.lanes[0].target])
            assert isinstance(info, ModelInfo), info
            self.info = info

    def _plan(self, fresh: list[Member]) -> list[tuple[Lane | None, list[Member]]]:
        """Where each new session goes: the least-loaded stream with room (at least ``streams`` of them; new ones
        as needed, ``None`` in the plan), so that sessions spread over streams, hence connections and workers."""
        cap = self.sessions_per_stream
        usable = [lane for lane in self.lanes if not lane.broken and not lane.draining and not lane.full]
        slots: list[list[Any]] = [[lane, lane.load(), []] for lane in usable if lane.load() < cap]
        slots += [[None, 0, []] for _ in range(self.streams - len(usable))]
        for m in fresh:
            room = [s for s in slots if s[1] < cap]
            if not room:
                room = [[None, 0, []]]
                slots.append(room[0])
            slot = min(room, key=lambda s: s[1])
            slot[1] += 1
            slot[2].append(m)
        return [(lane, group) for lane, _, group in slots if group]

    def _open_stream(self, group: list[Member], outcome: Outcome) -> GatewayRoutine[None]:
        """Open ``group`` on a new stream: the preferred target first; one that is UNAVAILABLE (down, draining)
        for every session is skipped for the next, which new streams then prefer."""
        skipped = []
        for index in [self.preferred, *candidates(len(self.targets), self.preferred, include_current=False)]:
            lane = yield from self._new_lane(index)
            p = Pending("open", lane, lane.seq(), group, outcome=Outcome())
            yield SendOn(lane.id, self._request(p))
            reply = yield ReceiveOn(lane.id, self.open_timeout_s)
            unavailable = self._refused_as_unavailable(reply, len(group))
            if unavailable is not None:
                skipped.append(f"{self.targets[index]}: {unavailable}")
                yield EndLane(lane.id)
                continue
            if isinstance(reply, Ended):  # another status: every target would answer it alike
                outcome.errors.update((m.key, reply.error) for m in group if reply.error is not None)
                yield EndLane(lane.id)
                return
            assert isinstance(reply, pb.MultiplexResponse)
            if self._adopt_opens(lane, group, reply, outcome):
                self.lanes.append(lane)
                self.preferred = index
            else:
                yield EndLane(lane.id)
            return
        error = UnavailableError("no server took the sessions: " + "; ".join(skipped))
        outcome.errors.update((m.key, error) for m in group)

    @staticmethod
    def _refused_as_unavailable(reply: object, n: int) -> str | None:
        """Why an open's answer says "try another target" (the stream ended UNAVAILABLE or without an answer, or
        every entry was refused UNAVAILABLE), else None."""
        if isinstance(reply, Ended):
            if reply.error is None:
                return "the stream ended before the open was answered"
            return reply.error.details if isinstance(reply.error, UnavailableError) else None
        assert isinstance(reply, pb.MultiplexResponse)
        if reply.WhichOneof("kind") == "error" and reply.error.code == UnavailableError.default_code.value[0]:
            return reply.error.message
        refusals = [e for e in reply.errors if e.code == UnavailableError.default_code.value[0]]
        return refusals[0].message if refusals and len(refusals) == n else None

    # -- stepping ---------------------------------------------------------------------------------

    def _step_blocks(self, blocks: list[tuple[list[Member], np.ndarray]], outcome: Outcome) -> GatewayRoutine[None]:
        """Send each block's rows to their sessions' streams (one request per stream, split only past the message
        size), every stream's requests before any answer is awaited; then collect the answers."""
        yield from self._settle()
        for lane in {m.lane.id: m.lane for members, _ in blocks for m in members if m.lane is not None}.values():
            if lane.move_wanted:
                yield from self._move(lane)
        pendings = []
        for members, xs in blocks:
            per = self._rows_per_message(int(xs.shape[1]))
            for lane, rows in self._rows_by_lane(members, outcome).items():
                sub = xs if len(rows) == len(members) else xs[rows]
                for k in range(0, len(rows), per):
                    group = [members[i] for i in rows[k : k + per]]
                    chunk = sub if len(rows) <= per else sub[k : k + per]
                    checkpoint = self._checkpoint_due(lane, group)
                    p = Pending("step", lane, lane.seq(), group, chunk, checkpoint=checkpoint, outcome=outcome)
                    pendings.append(p)
                    yield from self._transmit(lane, [p])
        for p in pendings:
            yield from self._wait(p)

    def _rows_by_lane(self, members: list[Member], outcome: Outcome) -> dict[Lane, list[int]]:
        rows: dict[Lane, list[int]] = {}
        for i, m in enumerate(members):
            if m.lane is None:  # lost since the call began (its stream's server refused it on a move)
                outcome.errors[m.key] = m.error or UnavailableError(f"session {m.key!r} has no stream")
            else:
                rows.setdefault(m.lane, []).append(i)
        return rows

    def _checkpoint_due(self, lane: Lane, members: list[Member]) -> bool:
        """Ask for tokens when a session of the request reaches ``checkpoint_every`` answered inputs since its
        token, or the stream's newest checkpoint is older than ``checkpoint_max_age_s`` (tokens expire)."""
        every = self.policy.checkpoint_every
        if every <= 0:
            return False
        if self._clock() - lane.checkpoint_at > self.policy.checkpoint_max_age_s:
            return True
        return any(len(m.since) + 1 >= every for m in members)

    # -- helpers ----------------------------------------------------------------------------------

    def _per_lane(
        self, kind: Literal["snapshot", "close"], members: list[Member], outcome: Outcome
    ) -> GatewayRoutine[None]:
        """One ``kind`` request per stream of ``members``, every one sent before any answer is awaited."""
        groups: dict[Lane, list[Member]] = {}
        for m in members:
            if m.lane is not None:
                groups.setdefault(m.lane, []).append(m)
        pendings = [Pending(kind, lane, lane.seq(), group, outcome=outcome) for lane, group in groups.items()]
        for p in pendings:
            yield from self._transmit(p.lane, [p])
        for p in pendings:
            yield from self._wait(p)

    def _member(self, key: str) -> Member:
        m = self.members.get(key)
        if m is None:
            raise KeyError(f"no session {key!r} in this gateway; open it first (gateway.open([{key!r}]))")
        return m

    @staticmethod
    def _distinct(keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("keys are str (a call id, a device id); got " + ", ".join(
                sorted({type(k).__name__ for k in keys if not isinstance(k, str)})))  # fmt: skip
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise ValueError(f"key {dup!r} is given twice; a call takes each session once")
        return keys

    def _check_usable(self) -> None:
        if self.closed:
            raise FailedPreconditionError("the gateway is closed; open a new one (client.gateway(...))")

    @staticmethod
    def _finish(outcome: Outcome, keys: Sequence[str], result: Any) -> Any:
        if outcome.errors:
            errors: dict[str, CellserveClientError] = {k: outcome.errors[k] for k in keys if k in outcome.errors}
            raise GatewayError(errors, result, len(keys))
        return result
