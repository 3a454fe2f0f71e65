"""The worker's timer threads: lease renewal, the watch for cancelled jobs, and maintenance,
each on its own timer, so that a long maintenance pass never lets our own leases lapse."""

import threading
from collections.abc import Callable

from jobs import queries
from jobs.maintenance import repeat, run_pass
from worker.claims import RunningClaims
from worker.services import Services

# How often a worker asks whether the jobs it is decoding were cancelled meanwhile.
CLAIM_CHECK_SECONDS = 1.0


class Timers:
    def __init__(self, services: Services, running: RunningClaims) -> None:
        self.services = services
        self.running = running
        self._stop = threading.Event()

    def renew(self) -> None:
        """Keep the claims of the batch we are running alive."""
        running = self.running.snapshot()
        if running:
            with self.services.session_scope() as session:
                queries.renew_leases(session, running, self.services.settings.lease_seconds)

    def watch_claims(self) -> None:
        """Notice jobs of the running batch that were cancelled (or their batch was), so
        their rows stop decoding now rather than run to max_tokens for nobody."""
        running = self.running.snapshot()
        if not running:
            return
        with self.services.session_scope() as session:
            lost = queries.lost_claims(session, running)
        self.running.mark_lost(running, lost)

    def maintain(self) -> None:
        """Give back dead workers' jobs, start due jobs, publish what may be lost."""
        services = self.services
        run_pass(services.session_scope, services.storage, services.queue, services.settings)

    def start(self) -> list[threading.Thread]:
        return [
            self._every(self.services.settings.lease_seconds / 3, self.renew, "mbatch-leases"),
            self._every(CLAIM_CHECK_SECONDS, self.watch_claims, "mbatch-claims"),
            self._every(
                self.services.settings.maintenance_interval_seconds,
                self.maintain,
                "mbatch-maintenance",
            ),
        ]

    def _every(self, interval: float, action: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(
            target=repeat, args=(interval, action, name, self._stop), name=name, daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
