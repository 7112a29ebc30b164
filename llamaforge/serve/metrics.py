"""Server metrics in the Prometheus text exposition format (version 0.0.4), without extra dependencies."""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = list(self._values.items()) or [((), 0.0)]
        lines += [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in items]
        return lines


class Gauge:
    """A value read when the metrics are rendered."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float] = _LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help
        self.buckets = list(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip([*self.buckets, float("inf")], counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]
        return lines


class ThroughputMeter:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._start = time.monotonic()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, tokens))
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._events)
        return total / max(1e-9, min(self.window, now - self._start))

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


def resident_memory_bytes() -> float:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


class Metrics:
    """Everything /metrics reports. Gauges read the engine wrapper's live counts via `sources`."""

    def __init__(self, prefix: str = "llamaforge") -> None:
        p = prefix
        self.requests = Counter(f"{p}_requests_total", "HTTP requests by endpoint and status code.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.finished = Counter(f"{p}_generations_finished_total", "Generations finished, by finish reason.")
        self.rejected = Counter(f"{p}_requests_rejected_total", "Requests refused because the queue was full.")
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = Histogram(f"{p}_request_duration_seconds", "Time from arrival to the last generated token.")
        self.throughput = ThroughputMeter()
        self.gauges: list[Gauge] = [
            Gauge(f"{p}_generation_tokens_per_second", "Generated tokens per second over the last 10 s.",
                  self.throughput.rate),
            Gauge("process_resident_memory_bytes", "Resident memory size in bytes.", resident_memory_bytes),
        ]  # fmt: skip

    def add_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def render(self) -> str:
        lines: list[str] = []
        metrics = [self.requests, self.prompt_tokens, self.generation_tokens, self.finished, self.rejected,
                   self.ttft, self.itl, self.e2e, *self.gauges]  # fmt: skip
        for metric in metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from the text format; for tests and the benchmark."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
