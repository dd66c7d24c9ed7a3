"""Getting a gateway stream's sessions onto another stream: after it broke (resume) or when its server drains
(move). No I/O (see ``cellserve.client.gateway_ops``).

Each session of the stream reopens from its token on one new stream to another target (the other targets from
the next one, then the same address again for a resume: a restarted server, or another ``--workers`` process
behind it), in rounds 50 ms → 1 s apart for up to ``resume_timeout_s``; the inputs answered since each token
are replayed in order (their outputs discarded: the caller had them), each session's last one asking for a
fresh token, and the requests the old stream left unanswered are sent again with the new handles, so that each
output reaches the caller exactly once. A target that takes some of the sessions and refuses others (another
model file, a token it cannot read, no room) takes those it can; the others fail for their keys alone.
"""

from __future__ import annotations

import logging

import numpy as np

from cellserve.client.errors import CellserveClientError, DataLossError, UnavailableError, UnknownError
from cellserve.client.gateway_errors import entry_error, request_error
from cellserve.client.gateway_lanes import Lanes
from cellserve.client.gateway_ops import Ended, EndLane, GatewayRoutine, Lane, Member, Pause, Pending, ReceiveOn, SendOn
from cellserve.client.recovery import REFUSALS, Recovery, candidates, replay_gap
from cellserve.v1 import cellserve_pb2 as pb

log = logging.getLogger(__name__)


class ResumingLanes(Lanes):
    """The lanes, and what keeps their sessions going when a stream breaks or its server drains."""

    def _wait(self, p: Pending) -> GatewayRoutine[None]:
        """Receive until ``p`` is answered, resuming or moving its stream as needed (``p.lane`` may change)."""
        while not p.done:
            lane = p.lane
            if lane.broken and p.kind in ("close", "open"):  # never resumed just to close; opens go elsewhere
                lane.inflight.remove(p)
                self._orphan(p, None)
            elif lane.broken:
                yield from self._recover(lane)
            elif lane.move_wanted:
                yield from self._move(lane)
            else:
                self._on_reply(lane, (yield ReceiveOn(lane.id)))

    def _recover(self, lane: Lane) -> GatewayRoutine[None]:
        """Reopen a broken stream's sessions from their tokens: the other targets, then the same one again."""
        yield EndLane(lane.id)
        for m in self._movers(lane):
            if m.gap:
                self._lose(m, replay_gap(self.targets[lane.target], m.gap, m.base_steps))
        if not self._movers(lane):
            self._retire(lane, None)
            return
        if lane.recovery is None:
            lane.recovery = Recovery(self.targets, self.policy.resume_timeout_s, self._clock())
        recovery = lane.recovery
        recovery.note(lane.target, f"{self.targets[lane.target]}: {lane.broken}", refused=False)
        while True:
            pause = recovery.next_round(self._clock())
            if isinstance(pause, CellserveClientError):
                self._retire(lane, pause)
                return
            if pause:
                yield Pause(pause)
            for index in candidates(len(self.targets), lane.target, include_current=True):
                if index not in recovery.refused and (yield from self._reopen(lane, index, recovery)):
                    return

    def _move(self, lane: Lane) -> GatewayRoutine[None]:
        """The server drains: reopen the stream's sessions elsewhere now, from its tokens; else (no target takes
        them all, or a step answered since a token was not kept) they stay, and go on its drain's final tokens."""
        lane.move_wanted = False
        movers = self._movers(lane)
        if not movers:
            return
        if any(m.gap for m in movers):  # checkpointing off: steps answered since their token are in no token
            log.info(
                "a draining gateway stream stays: steps since its tokens were not kept", extra={"sessions": len(movers)}
            )
            return
        recovery = Recovery(self.targets, self.policy.resume_timeout_s, self._clock())
        for index in candidates(len(self.targets), lane.target, include_current=False):
            if (yield from self._reopen(lane, index, recovery)):
                log.info("gateway stream moved off a draining server", extra={"target": self.targets[index]})
                return
        log.info("no other server took a draining gateway stream's sessions; they stay", extra=recovery.answers)

    def _reopen(self, old: Lane, index: int, recovery: Recovery) -> GatewayRoutine[bool]:
        """Open ``old``'s sessions on a new stream to ``targets[index]`` from their tokens, replay, send again what
        was unanswered. False (nothing changed) if the target took none of them."""
        movers = self._movers(old)
        new = yield from self._new_lane(index)
        opening = Pending("open", new, new.seq(), movers)
        yield SendOn(new.id, self._request(opening))
        reply = yield ReceiveOn(new.id, self.open_timeout_s)
        whole, problems = self._resume_problems(reply, movers, index)
        if whole is not None or len(problems) == len(movers) or (problems and not old.broken):
            recovery.answered(index, whole or next(iter(problems.values())))  # a move takes all or none: they stay
            yield EndLane(new.id)
            return False
        assert isinstance(reply, pb.MultiplexResponse)
        self.lanes[self.lanes.index(old)] = new
        opened = reply.opened.sessions
        stray = [
            Member(o.key, 0, handle=o.handle, closing=True) for i, o in enumerate(opened) if i in problems and o.handle
        ]
        for i, m in enumerate(movers):
            if i in problems:
                self._lose(m, self._refusal(index, m, problems[i]))
            else:
                self._place(new, m, opened[i])
        for m in [m for m in old.members.values() if m.lane is old]:
            self._forget(m)  # closing when the stream broke: closed
        replay = self._replay(new, [m for m in movers if m.lane is new])
        again = self._resend(old, new)
        stray_close = [Pending("close", new, new.seq(), stray)] if stray else []
        new.recovery = recovery if replay else None
        if not old.broken:
            yield EndLane(old.id)  # a move: leave the draining server
        yield from self._transmit(new, replay + again + stray_close)
        fields = {"target": self.targets[index], "sessions": len(movers) - len(problems)}
        log.info("gateway sessions resumed", extra={**fields, "replayed": sum(len(p.members) for p in replay)})
        return True

    def _refusal(self, index: int, m: Member, problem: CellserveClientError) -> CellserveClientError:
        """Why ``m`` cannot go on after ``targets[index]`` took its stream's other sessions and not it: a refusal
        of its state (token, model file) is data loss, as for a single session; anything else keeps its class."""
        if isinstance(problem, DataLossError) or problem.code in REFUSALS:
            return DataLossError(f"{self.targets[index]} could not continue session {m.key!r}: {problem}")
        return type(problem)(f"{self.targets[index]} could not take session {m.key!r} back: {problem.details}",
                             problem.code)  # fmt: skip

    def _resume_problems(
        self, reply: object, movers: list[Member], index: int
    ) -> tuple[CellserveClientError | None, dict[int, CellserveClientError]]:
        """Why a resume's answer cannot continue the stream (whole), or which of its sessions (per index)."""
        where = self.targets[index]
        if isinstance(reply, Ended):
            return reply.error or UnavailableError(f"{where} ended the stream before answering the resume"), {}
        assert isinstance(reply, pb.MultiplexResponse)
        kind = reply.WhichOneof("kind")
        if kind == "error":
            return request_error(reply.error, step=False), {}
        if kind != "opened" or len(reply.opened.sessions) != len(movers):
            return UnknownError(f"{where} answered a resume of {len(movers)} sessions with {kind!r}"), {}
        problems: dict[int, CellserveClientError] = {e.index: entry_error(e) for e in reply.errors}
        for i, (m, o) in enumerate(zip(movers, reply.opened.sessions, strict=True)):
            if i in problems:
                continue
            if m.model_sha256 and o.model_sha256 != m.model_sha256:
                problems[i] = DataLossError(
                    f"{where} serves model {o.model!r} from another file (sha256 {o.model_sha256[:12]}…, this "
                    f"session's is {m.model_sha256[:12]}…); every target must serve the same model file"
                )
            elif o.steps != m.base_steps:
                problems[i] = DataLossError(f"{where} resumed {o.steps} steps from a token of {m.base_steps}")
        return None, problems

    def _replay(self, lane: Lane, members: list[Member]) -> list[Pending]:
        """The inputs answered since each session's token, in rounds (round r: every session's r-th input, one
        request per step shape); each session's last replayed input asks for a fresh token."""
        out: list[Pending] = []
        for r in range(max((len(m.since) for m in members), default=0)):
            groups: dict[tuple, list[Member]] = {}
            for m in members:
                if len(m.since) > r:
                    groups.setdefault((m.since[r].shape, len(m.since) == r + 1), []).append(m)
            for (shape, last), group in groups.items():
                per = self._rows_per_message(shape[0])
                for k in range(0, len(group), per):
                    chunk = group[k : k + per]
                    xs = np.stack([m.since[r] for m in chunk])
                    out.append(Pending("replay", lane, lane.seq(), chunk, xs, checkpoint=last))
        return out

    def _resend(self, old: Lane, new: Lane) -> list[Pending]:
        """``old``'s unanswered steps and snapshots, for the sessions now on ``new``; the rest are orphans."""
        again = []
        for p in old.inflight:
            if p.kind not in ("step", "snapshot"):
                self._orphan(p, None)
                continue
            keep = [i for i, m in enumerate(p.members) if m.lane is new]
            if len(keep) < len(p.members) and p.outcome is not None:
                gone = [m for i, m in enumerate(p.members) if i not in keep]
                p.outcome.errors.update((m.key, m.error or UnavailableError("its stream is gone")) for m in gone)
            if not keep:
                p.done = True
                continue
            if len(keep) < len(p.members):
                p.members = [p.members[i] for i in keep]
                p.xs = p.xs[keep] if p.xs is not None else None
            p.lane, p.seq = new, new.seq()
            again.append(p)
        old.inflight.clear()
        old.members.clear()
        return again
