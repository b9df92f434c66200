"""One ledger per client: every release of something computed on its private data, and what it cost.

Every release the client makes is one entry of Gaussian mechanisms, recorded
with every parameter that determines its cost (noise multiplier = noise std /
L2 sensitivity, sample rate, steps) so anyone can recompute the epsilon with
Opacus's accountant (:func:`recompute_epsilon`). Entries compose in one
accountant: PRV (Opacus's default, tight) when the ledger holds few entries
(DP-SGD training, label counts, evaluation counts), RDP when releases are
counted per query sample (output noise: 10^4-10^6 Gaussian steps, where PRV
is slow and RDP's closed form at sample rate 1 is exact enough). A Laplace
release is pure epsilon-DP; it is added on top (basic composition).

The budget is enforced before a release, not after: :meth:`PrivacyLedger.charge`
computes the epsilon the ledger would hold with the release and refuses it
(:class:`BudgetExhausted`, RESOURCE_EXHAUSTED) when that exceeds the budget,
so a budget is never exceeded, not by one query.

One file, one budget, however many processes of the client use it: every
charge takes an exclusive lock on ``NAME.lock`` beside the ledger, reads what
the other processes added, charges and writes before the lock is released
(and before anything is sent). The file fails closed: every field is checked
when it is read, and a ledger that cannot be read, or holds an implausible
value, stops the client naming the file and the field. Each write increments
``sequence``, a counter the client can compare with what it last saw.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedkd.files import write_atomic
from fedkd.imports import load_heavy

try:
    import fcntl
except ImportError:  # not POSIX: one process per ledger file (the lock below is then this process's only)
    fcntl = None  # type: ignore[assignment]

from fedkd.contract import QueryError

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
LEDGER_FORMAT = "fedkd.ledger.v1"
BUDGET_REFUSAL = "privacy budget exhausted"  # how every budget refusal's message starts (the hub stops asking)


def ledger_path(checkpoint: str | Path) -> Path:
    """Where a client keeps a teacher's ledger: beside its checkpoint (``teacher.pt`` -> ``teacher.ledger.json``)."""
    return Path(checkpoint).with_suffix(".ledger.json")


class BudgetExhausted(QueryError):
    """A release would take the client past its privacy budget; nothing was released."""

    def __init__(self, message: str) -> None:
        super().__init__("RESOURCE_EXHAUSTED", message)


@dataclass(frozen=True)
class Entry:
    """One kind of release, repeated ``steps`` times with the same parameters."""

    kind: str  # "dp-sgd training", "logits", "input gradients", "label counts", "evaluation counts", ...
    noise_multiplier: float  # Gaussian noise std / L2 sensitivity (0 for a Laplace entry)
    sample_rate: float  # 1.0 for every release outside DP-SGD's Poisson batches
    steps: int
    sensitivity: float = 1.0  # L2 (Gaussian) or L1 (Laplace) sensitivity, for the record
    laplace_epsilon: float = 0.0  # per step, for a Laplace entry (pure DP)


MAX_NOISE = 1e6  # the largest noise multiplier a client's flags allow (--output-noise); more is not a ledger's
MAX_TEXT = 200


def _entry(raw: Any, where: str) -> Entry:
    """An entry read from a ledger file, every field checked: ValueError naming ``where`` and the field."""
    if not isinstance(raw, dict) or set(raw) - {f.name for f in fields(Entry)}:
        raise ValueError(f"{where} is not a ledger entry ({raw!r:.80})")
    try:
        entry = Entry(**raw)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None

    def bad(field: str, wants: str) -> ValueError:
        return ValueError(f"{where}.{field} is {getattr(entry, field)!r}, {wants}")

    if not isinstance(entry.kind, str) or not entry.kind or len(entry.kind) > MAX_TEXT:
        raise bad("kind", "not the name of a release")
    if not isinstance(entry.steps, int) or isinstance(entry.steps, bool) or entry.steps < 0:
        raise bad("steps", "not a non-negative integer")
    for field in ("noise_multiplier", "sample_rate", "sensitivity", "laplace_epsilon"):
        value = getattr(entry, field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise bad(field, "not a finite number >= 0")
    if not 0 < entry.sample_rate <= 1:
        raise bad("sample_rate", "not in (0, 1]")
    if entry.sensitivity <= 0:
        raise bad("sensitivity", "not > 0")
    if entry.laplace_epsilon == 0 and not 0 < entry.noise_multiplier <= MAX_NOISE:
        raise bad("noise_multiplier", f"not a Gaussian release's (in (0, {MAX_NOISE:g}])")
    if entry.laplace_epsilon > 0 and entry.noise_multiplier != 0:
        raise bad("noise_multiplier", "but a Laplace release has none")
    return entry


def _epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    load_heavy("opacus")
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return 0.0
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # PRV at sample rate 1
        warnings.filterwarnings("ignore", message="overflow encountered")  # PRV, on its way to failing
        warnings.filterwarnings("ignore", message="The algorithm does not converge")
        try:
            return float(acc.get_epsilon(delta))
        except (RuntimeError, ValueError) as exc:
            if accountant != "prv":
                raise
            # PRV's discretisation fails for some mixes (a release with very little noise beside DP-SGD):
            # RDP is a valid, looser bound; recompute_epsilon takes the same path, so the figures agree.
            logger.warning("PRV accountant failed (%s); epsilon from the RDP accountant instead", exc)
            return _epsilon(history, delta, "rdp")


def recompute_epsilon(record: dict[str, Any]) -> float:
    """The epsilon a ledger's record (:meth:`PrivacyLedger.record`) states, recomputed from its parameters alone."""
    entries = [_entry(e, f"entries[{i}]") for i, e in enumerate(record["entries"])]
    gaussian = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.laplace_epsilon == 0]
    pure = sum(e.laplace_epsilon * e.steps for e in entries)
    return _epsilon(gaussian, record["delta"], record["accountant"]) + pure


class PrivacyLedger:
    """The client's record of its releases and their composed cost; refuses releases beyond the budget.

    ``budget`` 0 means unlimited (the spend is still recorded and reported).
    """

    def __init__(self, *, delta: float, budget: float = 0.0, accountant: str = "prv",
                 path: str | Path | None = None) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"privacy delta: {delta!r} must lie in (0, 1)")
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(f"privacy epsilon budget: {budget!r} must be a finite number >= 0 (0 = unlimited)")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant: {accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
        self.delta = float(delta)
        self.budget = float(budget)
        self.accountant = accountant
        self.entries: list[Entry] = []
        self.refused = 0
        self.sequence = 0  # writes of the file so far (by every process of the client)
        self._spent = 0.0
        self._lock = threading.RLock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file as this process last read or wrote it
        self._held = False  # this process holds the file lock
        # What was released once and may be repeated at no cost (post-processing), e.g. the noisy label histogram.
        self.released: dict[str, Any] = {}
        # Figures kept for the report only, never to allow a release (PATE's data-dependent RDP curve).
        self.reports: dict[str, Any] = {}
        # Kept on the client's disk after every charge, so a restarted client goes on from what it has spent.
        self.path = Path(path) if path is not None else None
        self.fresh = self.path is None or not self.path.exists()  # nothing recorded before: see ReleasePolicy
        if not self.fresh:
            with self._exclusive():  # (read under the client's lock: another process may be writing it)
                pass

    def _stat(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's lock and, with a file, the client's: what other processes added is read first, and
        whatever is charged inside is written before any of them can charge."""
        with self._lock:
            if self.path is None or self._held:  # (held already by this thread: one flock per process)
                yield
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                self._held = True
                try:
                    now = self._stat()  # the file as it is under the lock: one stat, not one per question
                    if now is None and self._seen is not None:
                        raise ValueError(f"privacy ledger {str(self.path)!r} was deleted while this client "
                                         "used it; its releases would go uncounted: restore it")
                    if now is not None and now != self._seen:
                        self._load(self.path)
                    yield
                finally:
                    self._held = False
                    if fcntl is not None:
                        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _load(self, path: Path) -> None:
        def unreadable(why: str) -> ValueError:
            return ValueError(f"privacy ledger {str(path)!r} cannot be read: {why}. It records what this client "
                              "has released, so it is never silently replaced or trusted: restore it, or move it "
                              "away knowingly")

        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise unreadable(f"it is not readable JSON ({exc})") from None
        if not isinstance(saved, dict) or saved.get("format") != LEDGER_FORMAT:
            raise unreadable(f"it is not a {LEDGER_FORMAT} ledger")
        if not isinstance(saved.get("entries"), list):
            raise unreadable("field 'entries' is missing or not a list")
        try:
            entries = [_entry(e, f"entries[{i}]") for i, e in enumerate(saved["entries"])]
        except ValueError as exc:
            raise unreadable(str(exc)) from None
        delta, accountant = saved.get("delta"), saved.get("accountant")
        if not isinstance(delta, float) or not 0 < delta < 1 or accountant not in ACCOUNTANTS:
            raise unreadable(f"delta {delta!r} or accountant {accountant!r} is not a ledger's")
        for field in ("refused", "sequence"):
            value = saved.get(field, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise unreadable(f"field {field!r} is {value!r:.80}, not a count")
        for field in ("released", "reports"):
            if not isinstance(saved.get(field, {}), dict):
                raise unreadable(f"field {field!r} is not a table")
        if (delta, accountant) != (self.delta, self.accountant):
            raise ValueError(f"privacy ledger {str(path)!r} was kept at delta {delta:g} with the {accountant} "
                             f"accountant; these settings say delta {self.delta:g}, {self.accountant}: keep them")
        if saved.get("sequence", 0) < self.sequence:
            raise unreadable(f"it was rolled back (write {saved.get('sequence', 0)}, this client has seen write "
                             f"{self.sequence})")
        self.entries = entries
        self.refused = saved.get("refused", 0)
        self.sequence = saved.get("sequence", 0)
        self.released = dict(saved.get("released", {}))
        self.reports = dict(saved.get("reports", {}))
        self._spent = self._cost(entries)
        self._seen = self._stat()

    def reload(self) -> None:
        """Read the ledger again from its file (another process of the same client may have added to it)."""
        if self.path is not None:
            with self._exclusive():
                pass

    def remember(self, key: str, value: Any) -> None:
        """Keep what was released once (``released[key]``: repeating it is post-processing), written at once."""
        with self._exclusive():
            self.released[key] = value
            self.save()

    def save(self) -> None:
        """Write the ledger (the caller holds :meth:`_exclusive` when it changes what was charged)."""
        if self.path is None:
            return
        with self._exclusive():
            self.sequence += 1
            write_atomic(self.path, json.dumps({"format": LEDGER_FORMAT, **self._record(), "sequence": self.sequence,
                                                "released": self.released, "reports": self.reports}))
            self._seen = self._stat()

    @property
    def spent(self) -> float:
        return self._spent

    def _with(self, entry: Entry | None, base: list[Entry] | None = None) -> list[Entry]:
        entries = list(self.entries if base is None else base)
        if entry is None:
            return entries
        for i, e in enumerate(entries):  # same kind and parameters: one entry with more steps
            if (e.kind, e.noise_multiplier, e.sample_rate, e.sensitivity, e.laplace_epsilon) == (
                    entry.kind, entry.noise_multiplier, entry.sample_rate, entry.sensitivity, entry.laplace_epsilon):
                entries[i] = Entry(e.kind, e.noise_multiplier, e.sample_rate, e.steps + entry.steps, e.sensitivity,
                                   e.laplace_epsilon)
                return entries
        return [*entries, entry]

    def _cost(self, entries: Sequence[Entry]) -> float:
        gaussian = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.laplace_epsilon == 0]
        return _epsilon(gaussian, self.delta, self.accountant) + sum(e.laplace_epsilon * e.steps for e in entries)

    def _compose(self, entries: Sequence[Entry]) -> tuple[list[Entry], float]:
        """The ledger's entries with ``entries`` added (empty ones skipped), and the epsilon they compose to."""
        combined = list(self.entries)
        for entry in entries:
            if entry.steps <= 0:
                continue
            if entry.laplace_epsilon == 0 and not (entry.noise_multiplier > 0
                                                   and math.isfinite(entry.noise_multiplier)):
                raise ValueError(f"a Gaussian release needs a noise multiplier > 0, got {entry.noise_multiplier!r}")
            combined = self._with(entry, combined)
        return combined, self._cost(combined)

    def _refuse_past_budget(self, after: float, what: str, verb: str) -> None:
        """Count and raise :class:`BudgetExhausted` when ``after`` exceeds the budget (the caller holds the lock)."""
        if self.budget and after > self.budget:
            self.refused += 1
            self.save()
            raise BudgetExhausted(
                f"{BUDGET_REFUSAL}: {what} {verb} take this client to epsilon {after:.4g} at delta "
                f"{self.delta:.2g}, past its budget of {self.budget:g} (spent so far {self._spent:.4g}); "
                "nothing was released")

    def charge(self, entry: Entry | Sequence[Entry], *, what: str = "", enforce: bool = True) -> float:
        """Record ``entry`` (or several, composed and saved once) if the budget allows it, else raise
        :class:`BudgetExhausted` (nothing recorded). ``enforce`` False records a cost already incurred (DP-SGD
        training, or a release within the worst case :meth:`check` allowed) whatever the budget."""
        entries = [entry] if isinstance(entry, Entry) else list(entry)
        if all(e.steps <= 0 for e in entries):
            return self._spent
        with self._exclusive():
            combined, after = self._compose(entries)
            if enforce:
                steps = sum(e.steps for e in entries)
                self._refuse_past_budget(after, f"{what or entries[0].kind} ({steps} release(s))", "would")
            self.entries = combined
            self._spent = after
            self.save()
            return after

    def check(self, entries: Sequence[Entry], *, what: str) -> None:
        """Refuse (:class:`BudgetExhausted`, counted) unless the budget allows every one of ``entries`` on top of
        what is spent; records nothing. For a release whose exact cost is known only after it is computed: check
        its worst case first, then :meth:`charge` what it cost with ``enforce=False``."""
        if not self.budget:
            return
        with self._exclusive():
            self._refuse_past_budget(self._compose(entries)[1], what, "could")

    def record(self) -> dict[str, Any]:
        """Everything that determines the epsilon (and the epsilon itself), for the summary and Describe."""
        with self._lock:
            return self._record()

    def _record(self) -> dict[str, Any]:
        return {"epsilon_spent": self._spent, "epsilon_budget": self.budget, "delta": self.delta,
                "accountant": self.accountant, "refused": self.refused, "entries": [asdict(e) for e in self.entries]}
