"""When to contribute, the engine side: probes looked at, the policy's decision acted on.

While tasks run the probes are read once a second (and input idle time four times a
second under "only when idle"), so tasks freeze promptly. With no task running a decision
only gates taking new work, so the loop sleeps until the policy's next change of its own
(a schedule edge, the end of the idle time asked for, a hysteresis streak) or IDLE_INTERVAL,
whichever is sooner, and any command or task start wakes it at once. Without probes only
time can change a decision: it sleeps until then.

A mixin of WorkerEngine, like Session and TaskRuns: it freezes and thaws the running tasks
(together with a manual pause, which always wins), throttles them to the policy's CPU-time
share, gives their leases back past the limit, and says what changed (PolicyChanged event,
WAITING state, one log line, the reason in heartbeats).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from hivemind_worker.engine.events import EngineState, EventHub, PolicyChanged
from hivemind_worker.engine.policy import (
    Decision,
    Observation,
    Policy,
    PolicySettings,
    Verdict,
)
from hivemind_worker.engine.probes import NoProbes, Probes

if TYPE_CHECKING:
    from hivemind_worker.config import Settings
    from hivemind_worker.engine.executors.base import Executor
    from hivemind_worker.engine.runs import _Running
    from hivemind_worker.errors import ErrorKind
    from hivemind_worker.tasks import Resources

log = logging.getLogger(__name__)

POLICY_INTERVAL = 1.0  # while tasks run
POLICY_SLICES = 4  # cheap input checks between two evaluations (see _input_seen)
IDLE_INTERVAL = 10.0  # with no task running (a decision only gates new work): as heartbeats
MIN_WAIT = 0.05  # never spin on a deadline that has just passed


class Contribute:
    """The policy loop and what a decision does; WorkerEngine provides the rest."""

    _paused: bool
    _want_running: bool
    _running: dict[str, _Running]
    _hub: EventHub
    if TYPE_CHECKING:

        @property
        def executor(self) -> Executor: ...  # WorkerEngine's, chosen when run() starts

    if TYPE_CHECKING:

        def _set_state(
            self,
            state: EngineState,
            message: str = "",
            retry_at: float | None = None,
            error_kind: ErrorKind | None = None,
        ) -> None: ...

        def _refresh_state(self) -> None: ...

        def _spawn(self, coro: Awaitable[object], what: str) -> None: ...

        def _call(self, fn: Callable[[], object]) -> None: ...

        def _poke(self) -> None: ...

        def _withdraw_poll(self) -> None: ...

        async def _wait_changed(self, timeout: float | None = None) -> None: ...

        def _cancel_running(self) -> None: ...

        def _caps(self) -> Resources: ...

    def _init_policy(self, settings: Settings, probes: Probes | None) -> None:
        # Without probes only the rules that need none (schedule, CPU time) can hold.
        self._probes: Probes = probes or NoProbes()
        self._policy = Policy(PolicySettings.from_settings(settings))
        self._decision: Decision | None = None
        self._last_seen = Observation()
        self._suspended = False  # the policy holds the tasks (a manual pause is _paused)
        self._suspended_at: float | None = None  # monotonic, for the give-back limit
        self._gave_back = False  # this suspension's leases were given back already
        self._frozen = False  # what the executor was last told: paused or not
        self._share_applied: tuple[float, frozenset[str]] = (1.0, frozenset())

    # ------------------------------------------------------------------ public

    @property
    def decision(self) -> Decision | None:
        """The policy's latest decision; None before the first evaluation."""
        return self._decision

    def contribute_anyway(self, seconds: float) -> None:
        """Run tasks for `seconds` whatever the policy says (0 ends it); a manual pause still
        wins."""

        def override() -> None:
            self._policy.override(time.time() + seconds if seconds > 0 else None)
            if self._decision is None:
                return  # not deciding yet: the first decision holds the override
            # Decided again at once on what the probes saw last (the probes themselves are
            # only ever asked from the policy loop, one call at a time).
            self._apply_decision(self._policy.evaluate(self._last_seen, _now()))
            self._poke()  # the policy loop's next wake-up moves with the override's end

        self._call(override)

    # ------------------------------------------------------------------ hooks for the engine

    def _held(self) -> bool:
        """No new task now: paused by hand or by the policy."""
        return self._paused or self._suspended

    def _sync_frozen(self) -> None:
        """Freeze or thaw the running tasks to match the manual pause and the policy."""
        frozen = self._held()
        if frozen != self._frozen:
            self._frozen = frozen
            self._spawn(self.executor.pause() if frozen else self.executor.resume(), "freeze")

    def _configure_policy(self, settings: Settings) -> None:
        self._policy.configure(PolicySettings.from_settings(settings))
        self._share_applied = (-1.0, frozenset())  # re-applied at the next evaluation

    def _waiting_state(self) -> bool:
        """Set WAITING with the reason if the policy holds the tasks; False if it does not."""
        if not self._suspended or self._decision is None:
            return False
        decision = self._decision
        self._set_state(
            EngineState.WAITING,
            decision.text + (f" — {decision.hint}" if decision.hint else ""),
            decision.resume_at,
        )
        return True

    def _status_message(self) -> str:
        """Why the node is paused, for the heartbeat; empty when it is not."""
        if self._paused:
            return "paused by hand"
        if self._suspended and self._decision is not None:
            return self._decision.text
        return ""

    # ------------------------------------------------------------------ the loop

    async def _policy_loop(self) -> None:
        while True:
            try:
                if self._want_running:  # stopped, there is nothing to decide about
                    await self._evaluate_policy()
            except Exception:
                log.exception("policy evaluation failed")
            if any(not r.finished for r in self._running.values()):
                for _ in range(POLICY_SLICES):
                    await asyncio.sleep(POLICY_INTERVAL / POLICY_SLICES)
                    if await self._input_seen():
                        break
            elif self._want_running:
                await self._wait_changed(self._idle_wait())
            else:
                await self._wait_changed()  # until start (or a setting) pokes

    def _idle_wait(self) -> float | None:
        """Seconds to the next evaluation with no task running (see the module's docstring)."""
        change = self._policy.next_change()
        until_change = None if change is None else max(MIN_WAIT, change - time.time())
        if isinstance(self._probes, NoProbes):
            return until_change  # nothing observed can change: only time, or a poke
        return IDLE_INTERVAL if until_change is None else min(IDLE_INTERVAL, until_change)

    async def _input_seen(self) -> bool:
        """Between evaluations, a look at input idle time alone (one X round trip) while
        "only when idle" lets tasks run: a person touching the mouse then freezes them well
        within a second, without running every probe more often."""
        minutes = self._policy.settings.idle_only_minutes
        if minutes <= 0 or self._suspended or not self._running:
            return False
        try:
            idle = await asyncio.to_thread(self._probes.idle_seconds)
        except Exception:
            log.exception("idle probe failed")
            return False
        return idle is not None and idle < minutes * 60

    async def _evaluate_policy(self) -> None:
        self._last_seen = await asyncio.to_thread(self._probes.observe)
        self._apply_decision(self._policy.evaluate(self._last_seen, _now()))

    def _apply_decision(self, decision: Decision) -> None:
        """Act on one decision: freeze or thaw, throttle, give leases back; say what changed."""
        previous, self._decision = self._decision, decision
        suspended = decision.verdict is Verdict.SUSPEND
        if suspended != self._suspended:
            self._suspended = suspended
            self._suspended_at = time.monotonic() if suspended else None
            self._gave_back = False
            if suspended:
                self._withdraw_poll()
            self._sync_frozen()
            self._poke()
        if not decision.same_as(previous):
            if previous is not None or decision.verdict is not Verdict.RUN:
                log.info("when to contribute: %s", decision.line())
            self._publish_policy(decision)
            self._refresh_state()
        self._apply_share(decision)
        limit = self._policy.settings.give_back_minutes * 60
        if (
            suspended
            and limit > 0
            and not self._gave_back
            and self._suspended_at is not None
            and time.monotonic() - self._suspended_at >= limit
        ):
            self._give_back_all(decision)

    def _apply_share(self, decision: Decision) -> None:
        """Bring running tasks to the policy's CPU-time share (and new tasks as they start)."""
        share = decision.throttle_percent / 100.0
        running = frozenset(r.spec.task_id for r in self._running.values() if not r.finished)
        if (share, running) == self._share_applied:
            return
        changed = share != self._share_applied[0]
        self._share_applied = (share, running)
        self.executor.cpu_time_share = share
        if running and (changed or share < 1.0):
            self._spawn(self.executor.apply_caps(self._caps()), "apply CPU share")

    def _give_back_all(self, decision: Decision) -> None:
        """Suspended past the limit: stop the frozen tasks; their CANCELLED reports give the
        leases back, so the pool runs them elsewhere. Nothing new is taken meanwhile."""
        self._gave_back = True
        runs = [r for r in self._running.values() if not r.finished and not r.cancel_requested]
        if not runs:
            return
        minutes = self._policy.settings.give_back_minutes
        log.warning(
            "suspended for %g minutes (%s): giving %d task(s) back to the pool to run elsewhere",
            minutes, decision.text, len(runs),
        )  # fmt: skip
        self._cancel_running()
        self._publish_policy(decision, given_back=len(runs))

    def _publish_policy(self, decision: Decision, given_back: int = 0) -> None:
        line = decision.line()
        if given_back:
            line += f"; gave {given_back} task(s) back to the pool"
        self._hub.publish(
            PolicyChanged(
                decision,
                line,
                manual_pause=self._paused,
                override_until=self._policy.override_until,
                given_back=given_back,
            )
        )


def _now() -> datetime:
    """Local wall-clock time, for the schedule."""
    return datetime.now().astimezone()
