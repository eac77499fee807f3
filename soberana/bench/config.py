"""What one `soberana bench` invocation measures: target, workload, load and report settings."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit, urlunsplit

from soberana.config_flags import flag

ENDPOINTS = ("chat", "completions")
WORKLOADS = ("random", "prefix", "multiturn", "file")
SLO_KEYS = ("ttft", "tpot", "e2e")


class BenchConfigError(ValueError):
    """A bad `soberana bench` argument; the message names the argument and what is allowed."""


@dataclass(frozen=True)
class LengthRange:
    """A token length (or a duration) drawn uniformly from [low, high], both inclusive."""

    low: float
    high: float

    def sample_int(self, rng: random.Random) -> int:
        """One integer length from the range."""
        return rng.randint(int(self.low), int(self.high))

    def sample_float(self, rng: random.Random) -> float:
        """One real value (e.g. seconds) from the range."""
        return self.low if self.low == self.high else rng.uniform(self.low, self.high)

    def __str__(self) -> str:
        """As written on the command line: `N` or `LO:HI`."""
        return f"{self.low:g}" if self.low == self.high else f"{self.low:g}:{self.high:g}"

    def to_json(self) -> int | float | list[float]:
        """`N` when fixed, `[LO, HI]` when ranged (as written in summary.json)."""
        return self.low if self.low == self.high else [self.low, self.high]


def parse_range(text: str, name: str, *, integer: bool = True, minimum: float = 1) -> LengthRange:
    """Parse `N` or `LO:HI` for argument `name`; both ends must be >= `minimum`."""
    parts = text.split(":")
    kind = "an integer" if integer else "a number"
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        values = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        raise BenchConfigError(f"{name} must be {kind} N or a range LO:HI, got {text!r}") from None
    low, high = values[0], values[-1]
    if low < minimum or high < low or not math.isfinite(high):
        raise BenchConfigError(f"{name} must satisfy {minimum} <= LO <= HI, got {text!r}")
    return LengthRange(low, high)


def parse_positive_float(text: str, name: str, *, allow_inf: bool = False) -> float:
    """Parse a number > 0 (or `inf` when allowed) for argument `name`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        allowed = "a number > 0" + (" or inf" if allow_inf else "")
        raise BenchConfigError(f"{name} must be {allowed}, got {text!r}")
    return value


def parse_percentiles(text: str) -> list[float]:
    """Parse `--percentiles 50,90,99.9` into sorted unique values in (0, 100]."""
    try:
        values = sorted({float(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise BenchConfigError(
            f"--percentiles must be numbers like 50,90,99, got {text!r}"
        ) from None
    if not values or values[0] <= 0 or values[-1] > 100:
        raise BenchConfigError(f"--percentiles must be in (0, 100], got {text!r}")
    return values


def parse_slo(text: str) -> dict[str, float]:
    """Parse `--slo ttft=200,tpot=50,e2e=2000` (milliseconds) into {key: ms}."""
    slo: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise BenchConfigError(
                f"--slo takes KEY=MS pairs with KEY in {', '.join(SLO_KEYS)}, got {item!r}"
            )
        slo[key] = parse_positive_float(value, f"--slo {key}")
    return slo


@dataclass(frozen=True)
class LoadPoint:
    """One load level: a closed loop of `concurrency` users or an open loop at `request_rate`."""

    concurrency: int | None = None  # closed loop size, or the in-flight cap of an open loop
    request_rate: float | None = None  # requests/s; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1.0 is Poisson

    @property
    def mode(self) -> str:
        """`open` when requests arrive at a rate, `closed` when each user waits for its answer."""
        return "open" if self.request_rate is not None else "closed"

    @property
    def label(self) -> str:
        """A short name for tables and file names, e.g. `c10` or `r2.5`."""
        if self.request_rate is None:
            return f"c{self.concurrency}"
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"r{rate}" + (f"-c{self.concurrency}" if self.concurrency else "")

    def to_json(self) -> dict:
        """The load as written in summary.json."""
        rate = self.request_rate
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "request_rate": "inf" if rate is not None and math.isinf(rate) else rate,
            "burstiness": self.burstiness,
        }


def parse_sweep(text: str, base: LoadPoint) -> list[LoadPoint]:
    """Parse `--sweep concurrency=1,4,16` or `--sweep rate=1,2,4` into load points."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in ("concurrency", "rate", "request_rate"):
        raise BenchConfigError(
            f"--sweep must be concurrency=C1,C2,... or rate=R1,R2,..., got {text!r}"
        )
    points = []
    for value in values.split(","):
        if key == "concurrency":
            points.append(
                LoadPoint(parse_count(value, "--sweep concurrency"), None, base.burstiness)
            )
        else:
            rate = parse_positive_float(value, "--sweep rate", allow_inf=True)
            points.append(LoadPoint(base.concurrency, rate, base.burstiness))
    return points


def parse_count(text: str, name: str, minimum: int = 1) -> int:
    """Parse an integer >= `minimum` for argument `name`."""
    try:
        value = int(text)
    except ValueError:
        raise BenchConfigError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise BenchConfigError(f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL without a trailing slash; a bare host gets `/v1` appended."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BenchConfigError(
            f"--base-url must be an http(s) URL like http://127.0.0.1:8000/v1, got {url!r}"
        )
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def default_metrics_url(base_url: str) -> str:
    """Prometheus metrics live at the server root, beside `/v1` (vLLM and Soberana)."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/metrics", "", ""))


@dataclass
class Target:
    """The endpoint under test and what every request carries."""

    base_url: str
    endpoint: str = "completions"
    model: str | None = None
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)
    metrics_url: str | None = None  # None: do not read server metrics
    timeout_s: float = 600.0

    @property
    def url(self) -> str:
        """The URL requests are POSTed to."""
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return self.base_url + path

    def to_json(self) -> dict:
        """The target as written in summary.json (never the API key)."""
        return {
            "base_url": self.base_url,
            "endpoint": self.endpoint,
            "model": self.model,
            "metrics_url": self.metrics_url,
            "extra_body": self.extra_body,
            "timeout_s": self.timeout_s,
        }


DEFAULT_OUTPUT_LEN = LengthRange(128, 128)  # max_tokens when neither option nor dataset says


@dataclass
class WorkloadConfig:
    """Which prompts to send and how long their answers are (the `workload` flags)."""

    name: str = flag("random", "what the requests look like (docs/bench.md)", name="--workload",
                     choices=WORKLOADS)  # fmt: skip
    input_len: LengthRange = flag(
        LengthRange(256, 256), "tokens of each request's own text: the prompt (random), the "
        "suffix (prefix), the question (multiturn) (default 256)", parse=parse_range,
        metavar="N|LO:HI")
    # None: the workload's default (128, or the dataset's)
    output_len: LengthRange | None = flag(
        None, "max_tokens per request (default 128; file: the dataset's answer length)",
        parse=parse_range, metavar="N|LO:HI")
    num_prefixes: int = flag(4, "prefix: shared prefixes (default %(default)s)", parse=parse_count,
                             metavar="N")  # fmt: skip
    prefix_len: int = flag(256, "prefix: tokens of each shared prefix (default %(default)s)",
                           parse=parse_count, metavar="N")  # fmt: skip
    suffixes_per_prefix: int = flag(
        8, "prefix: distinct suffixes per prefix (default %(default)s)", parse=parse_count,
        metavar="M")
    num_users: int = flag(
        8, "multiturn: conversations in progress at a time (default %(default)s)",
        parse=parse_count, metavar="U")
    num_rounds: int = flag(
        4, "multiturn: question/answer rounds per user (default %(default)s)", parse=parse_count,
        metavar="R")
    system_prompt_len: int = flag(
        256, "multiturn: tokens of the system prompt all users share (default %(default)s)",
        parse=partial(parse_count, minimum=0), metavar="N")
    history_len: int = flag(
        0, "multiturn: tokens of each user's own context, before their first question",
        parse=partial(parse_count, minimum=0), metavar="N")
    think_time: LengthRange = flag(
        LengthRange(0.0, 0.0), "multiturn: seconds between an answer and the user's next "
        "question", parse=partial(parse_range, integer=False, minimum=0), metavar="S|LO:HI")
    dataset_path: str | None = flag(
        None, "file: JSONL of {prompt}, {messages} or ShareGPT {conversations}", metavar="FILE")

    def to_json(self) -> dict:
        """The settings that shaped this workload, as written in summary.json."""
        output_len = self.output_len or (None if self.name == "file" else DEFAULT_OUTPUT_LEN)
        # None: each file entry's own length (see dataset_file.py).
        out: dict = {"name": self.name, "output_len": output_len.to_json() if output_len else None}
        if self.name != "file":
            out["input_len"] = self.input_len.to_json()
        if self.name == "prefix":
            out |= {
                "num_prefixes": self.num_prefixes,
                "prefix_len": self.prefix_len,
                "suffixes_per_prefix": self.suffixes_per_prefix,
            }
        elif self.name == "multiturn":
            out |= {
                "num_users": self.num_users,
                "num_rounds": self.num_rounds,
                "system_prompt_len": self.system_prompt_len,
                "history_len": self.history_len,
                "think_time_s": self.think_time.to_json(),
            }
        elif self.name == "file":
            out["dataset_path"] = self.dataset_path
        return out


@dataclass
class BenchConfig:
    """Everything one invocation needs, validated."""

    target: Target
    workload: WorkloadConfig
    loads: list[LoadPoint]
    # None: the workload's natural size, or unbounded with duration
    num_prompts: int | None = flag(
        None, "requests per run (default: the workload's size, 100 for random)", parse=parse_count,
        metavar="N")
    duration_s: float | None = flag(None, "stop starting requests after S seconds",
                                    name="--duration", parse=parse_positive_float, metavar="S")  # fmt: skip
    warmup: int = flag(0, "requests sent first and not counted",
                       parse=partial(parse_count, minimum=0), metavar="N")  # fmt: skip
    seed: int = flag(0, "seed of the workload's random draws")
    percentiles: list[float] = flag(
        help="default 50,90,95,99", default_factory=lambda: [50.0, 90.0, 95.0, 99.0],
        parse=lambda text, _flag: parse_percentiles(text), metavar="P1,P2")
    slo: dict[str, float] = flag(
        help="goodput: requests within every limit (default: none)", default_factory=dict,
        parse=lambda text, _flag: parse_slo(text), metavar="ttft=MS,tpot=MS,e2e=MS")
    tokenizer: str | None = flag(
        None, "Hugging Face tokenizer directory for exact lengths (default: --model if it is a "
        "local directory)", metavar="DIR")
    output_dir: str | None = flag(None, "write requests.csv, summary.json, PNG plots",
                                  metavar="DIR")  # fmt: skip
    progress: bool = flag(True, "a live progress bar (--no-progress: none)")
    command_line: list[str] = field(default_factory=list)
