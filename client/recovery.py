"""One episode of getting a session back after its server drained or vanished: which targets to try,
in what order, how long to wait between rounds, and what the caller is told when nothing works.

No I/O: ``SessionCore`` asks ``Recovery`` and performs the attempts through its shell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from cellserve.client.errors import CellserveClientError, DataLossError, UnavailableError

# A target that answers an open with one of these refuses the session's state itself (its token, model
# file or keys): trying it again cannot help. Any other answer (UNAVAILABLE, RESOURCE_EXHAUSTED, ...) may
# change, so that target is tried again after a pause.
REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
FIRST_PAUSE_S, MAX_PAUSE_S = 0.05, 1.0  # backoff between rounds of attempts


def replay_gap(target: str, gap: int, base_steps: int) -> DataLossError:
    """Why a session cannot resume: ``gap`` answered steps after its token (at ``base_steps``) were not kept."""
    return DataLossError(
        f"{target} is gone and {gap} steps were answered after this session's last resume token (at step "
        f"{base_steps}) with checkpointing off (checkpoint_every=0): it cannot continue exactly; use "
        "checkpoint_every > 0, or snapshot() after steps you cannot redo"
    )


def candidates(n: int, current: int, *, include_current: bool) -> list[int]:
    """Targets to try, in order: the others from the next one on, then (for a resume) the same address
    again, which a restarted server or another worker behind it may answer."""
    others = [(current + k) % n for k in range(1, n)]
    return [*others, current] if include_current else others


@dataclass
class Recovery:
    """From a failure until the replay has caught up (a resume that fails again stays in the episode)."""

    targets: tuple[str, ...]
    timeout_s: float
    started: float
    rounds: int = 0  # rounds of attempts begun
    pause: float = FIRST_PAUSE_S
    refused: set[int] = field(default_factory=set)  # targets that refuse the session's state
    answers: dict[int, str] = field(default_factory=dict)  # target index -> its latest answer

    def note(self, index: int, answer: str, *, refused: bool) -> None:
        self.answers[index] = answer
        if refused:
            self.refused.add(index)

    def answered(self, index: int, problem: CellserveClientError) -> None:
        """A target did not take the session."""
        refused = isinstance(problem, DataLossError) or problem.code in REFUSALS
        self.note(index, f"{self.targets[index]}: {problem}", refused=refused)

    def next_round(self, now: float) -> float | CellserveClientError:
        """Seconds to wait before the next round (0 for the first), or the error to give up with."""
        self.rounds += 1
        if len(self.refused) == len(self.targets):
            return self.give_up()  # every target refuses the state: waiting cannot help
        if self.rounds == 1:
            return 0.0
        left = self.timeout_s - (now - self.started)
        if left <= 0:
            return self.give_up()
        pause, self.pause = min(self.pause, left), min(self.pause * 2, MAX_PAUSE_S)
        return pause

    def give_up(self) -> CellserveClientError:
        answers = "; ".join(self.answers.values())
        if self.refused:  # a server refused the state itself (expired token, other weights or keys)
            return DataLossError(f"no server could continue this session; {answers}")
        return UnavailableError(f"no server took the session within {self.timeout_s:g} s; {answers}")
