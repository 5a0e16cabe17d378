"""Rate limiting against a real limiting server on 127.0.0.1 (the simulator).

The simulator (``pipeline.simulator``) enforces RPM/TPM as continuously refilled token
buckets over a short window and records when it admitted (``accepted_at``) and refused
(``rejected_at``) each request. It runs on its own event loop in a background thread;
the client runs in-process through ``pipeline.cli.main``. One test per mechanism:

(a) pacing to a user budget          (b) learning the limit from x-ratelimit-* headers
(c) the pool-wide pause on a 429     (d) adapting with neither budget nor headers
(e) reconciling reserved tokens with the usage the server reports

Each asserts a property a broken mechanism would violate; the comments give the number
a broken client would produce. Image URLs are http(s), passed through unfetched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import read_out, write_manifest

from pipeline.simulator.app import SimConfig, SimStats
from pipeline.simulator.thread import SimThread

WINDOW = 2.0  # the server's limits are per WINDOW seconds
PER_MINUTE = 60.0 / WINDOW  # server limit per window -> client budget per minute


@dataclass
class Run:
    code: int
    stats: SimStats
    df: Any
    seconds: float

    @property
    def accepted(self) -> list[float]:
        return sorted(self.stats.accepted_at)

    @property
    def rejected(self) -> list[float]:
        return sorted(self.stats.rejected_at)

    @property
    def share_429(self) -> float:
        return self.stats.requests_429 / max(1, self.stats.requests_total)

    def steady_rate(self) -> float:
        """Accepted requests per second after the first window (in which the server's
        full bucket lets any client burst above the limit)."""
        times = self.accepted
        steady = [t for t in times if t >= times[0] + WINDOW]
        assert len(steady) >= 10, f"too few requests after the first window: {len(steady)}"
        return (len(steady) - 1) / (steady[-1] - steady[0])

    def rejected_after_first_window(self) -> int:
        t0 = self.accepted[0]
        return sum(1 for t in self.rejected if t >= t0 + WINDOW)

    def describe(self) -> str:
        times = self.accepted + self.rejected
        t0 = min(times) if times else 0.0
        acc: dict[int, int] = {}
        rej: dict[int, int] = {}
        for t in self.accepted:
            acc[int((t - t0) * 2)] = acc.get(int((t - t0) * 2), 0) + 1
        for t in self.rejected:
            rej[int((t - t0) * 2)] = rej.get(int((t - t0) * 2), 0) + 1
        last = int((max(times) - t0) * 2) + 1 if times else 0
        per_half = " ".join(f"{acc.get(k, 0)}/{rej.get(k, 0)}" for k in range(last))
        return (f"exit={self.code} requests={self.stats.requests_total} "
                f"429s={self.stats.requests_429} wall={self.seconds:.1f}s "
                f"accepted/429 per 0.5 s: {per_half}")


def caption_against(sim_config: SimConfig, tmp_path: Path, rows: int, *args: str,
                    concurrency: int = 8) -> Run:
    """Run ``caption`` on ``rows`` URL images against a fresh simulator."""
    from pipeline.cli import main

    manifest = write_manifest(tmp_path / "m.csv",
                              [{"id": f"r{i:03d}", "image": f"http://img.test/{i}.jpg"}
                               for i in range(rows)])
    out = tmp_path / "out"
    sim = SimThread(sim_config)
    try:
        t0 = time.monotonic()
        code = main(["caption", str(manifest), "--out", str(out), "--base-url", sim.base_url,
                     "--no-progress", "--concurrency", str(concurrency),
                     "--backoff-base", "0.2", "--backoff-max", "1", "--retries", "8",
                     "--read-timeout", "10", *args])
        seconds = time.monotonic() - t0
    finally:
        sim.stop()
    return Run(code, sim.stats, read_out(out), seconds)


def assert_all_ok(run: Run, rows: int) -> None:
    assert run.code == 0, run.describe()
    assert len(run.df) == rows
    assert set(run.df["status"]) == {"ok"}, run.df[run.df["status"] != "ok"][
        ["id", "error_class", "error"]].to_string()


def server(rpm: int | None = None, tpm: int | None = None, headers: bool = False,
           **kw: Any) -> SimConfig:
    return SimConfig(latency=0.02, tokens_per_second=0, rpm=rpm, tpm=tpm, window=WINDOW,
                     rate_limit_headers=headers, **kw)


# --------------------------------------------------------------------------- scenarios

RPM = 20        # server: 20 requests per 2 s window = 10 requests/s
LIMIT_RPS = RPM / WINDOW


@pytest.fixture(scope="module")
def unpaced_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """No budget, no headers: the client has only 429s to go by. Shared by (a), as the
    control that shows the server does punish an unpaced client, and by (d)."""
    return caption_against(server(rpm=RPM), tmp_path_factory.mktemp("unpaced"), 60)


def test_a_budget_equal_to_the_limit_paces_without_429s(tmp_path, unpaced_run):
    run = caption_against(server(rpm=RPM), tmp_path, 50, "--rpm", str(RPM * PER_MINUTE))
    assert_all_ok(run, 50)
    assert run.stats.requests_429 == 0, run.describe()
    assert run.stats.requests_total == 50
    # Steady state: one request every 1/LIMIT_RPS s. An unpaced client runs faster
    # (and is refused), a budget misread by 60x or applied twice runs far slower.
    assert run.steady_rate() == pytest.approx(LIMIT_RPS, rel=0.15), run.describe()
    # Control: the same server, no budget and no headers does get refused, so the
    # zero above is the budget's doing.
    assert unpaced_run.stats.requests_429 > 0, unpaced_run.describe()


def test_b_limits_read_from_headers_pace_near_the_limit(tmp_path):
    run = caption_against(server(rpm=RPM, headers=True), tmp_path, 50)
    assert_all_ok(run, 50)
    # Once the server's initial burst is spent the learned rate keeps the client from
    # being refused at all; the adaptive fallback is refused ~10 times per run here.
    assert run.stats.requests_429 <= 2, run.describe()
    assert run.rejected_after_first_window() <= 1, run.describe()
    # ... while running at the limit: the adaptive fallback settles near 0.6 x limit.
    assert run.steady_rate() == pytest.approx(LIMIT_RPS, rel=0.15), run.describe()


def test_b_token_limits_read_from_headers(tmp_path):
    """The same for tokens: the x-ratelimit-*-tokens headers alone keep a run that
    reserves max_tokens=1000 per request (server: 20 000 tokens per 2 s) from 429s."""
    tpm = 20_000
    run = caption_against(server(tpm=tpm, headers=True), tmp_path, 50, "--max-tokens", "1000")
    assert_all_ok(run, 50)
    assert run.stats.requests_429 <= 2, run.describe()
    assert run.rejected_after_first_window() <= 1, run.describe()
    # ... at the token limit: as many requests as the tokens really used allow
    # (~9/s); the adaptive fallback, reading no headers, manages ~2.5/s here.
    per_request = run.stats.tokens_served / len(run.accepted)
    ideal = tpm / WINDOW / per_request
    assert run.steady_rate() > 0.8 * ideal, (run.steady_rate(), ideal, run.describe())


def test_c_a_429_with_retry_after_pauses_the_whole_pool(tmp_path):
    # 10% of requests get an injected 429 with Retry-After: 1; no other limit.
    run = caption_against(server(fail_rate=0.1, fail_modes=("429",), seed=1), tmp_path, 40,
                          concurrency=4)
    assert_all_ok(run, 40)
    rejected, accepted = run.rejected, run.accepted
    assert len(rejected) >= 3, "test precondition: some 429s: " + run.describe()
    assert set(run.df["retry_after_s"].dropna()) == {1.0}
    # Requests already on the wire when the 429 was sent may still arrive (slack 0.2 s);
    # after that nobody in the pool may send until Retry-After has elapsed. A pause
    # that held only the refused worker lets the other 3 go on sending meanwhile.
    slack, retry_after = 0.2, 1.0
    for r in rejected:
        during = [round(a - r, 3) for a in accepted if r + slack < a < r + retry_after - 0.05]
        assert during == [], f"accepted {during} s after the 429 at {r - accepted[0]:.3f}: " \
                             + run.describe()
    resumed = [r for r in rejected
               if any(r + retry_after - 0.05 <= a < r + retry_after + 0.5 for a in accepted)]
    assert len(resumed) >= len(rejected) - 1, "test precondition: work pending after 429s"


def test_d_adaptive_without_budget_or_headers_completes_with_few_429s(unpaced_run):
    assert_all_ok(unpaced_run, 60)
    # The initial burst costs about one 429 per worker (8 here); after that the rate
    # learned from the 429s must hold. Retrying on Retry-After alone (no rate learned)
    # gets ~80% 429s here and rows fail after exhausting their retries.
    assert unpaced_run.share_429 < 0.20, unpaced_run.describe()
    assert unpaced_run.rejected_after_first_window() <= 2, unpaced_run.describe()


def test_e_reported_usage_refunds_the_max_tokens_reservation(tmp_path):
    tpm, max_tokens, rows = 20_000, 1000, 60
    run = caption_against(server(tpm=tpm), tmp_path, rows, "--tpm", str(tpm * PER_MINUTE),
                          "--max-tokens", str(max_tokens))
    assert_all_ok(run, rows)
    assert run.stats.requests_429 == 0, run.describe()
    prompt = run.stats.prompt_tokens / rows          # ~1085 (a 1024x768 URL image + text)
    completion = run.stats.completion_tokens / rows  # ~14: captions are short
    assert completion < 50, "test precondition: completions far below max_tokens"
    tokens_per_s = tpm / WINDOW
    # Never refunding the unused reservation charges each request at least the real
    # prompt plus max_tokens: at most this many requests a second after the first window.
    unrefunded = tokens_per_s / (prompt + max_tokens)  # ~4.8/s
    ideal = tokens_per_s / (prompt + completion)       # ~9.1/s when charged what was used
    rate = run.steady_rate()
    assert rate > 1.5 * unrefunded, (rate, unrefunded, ideal, run.describe())
    assert rate > 0.8 * ideal, (rate, unrefunded, ideal, run.describe())
