"""report.html: its structure from summary.json fixtures, `echo-prefix report DIR`, and the page in a real Chromium."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fleet_evidence import fleet_result as routed
from headless_chromium import chromium_path, open_page
from test_report import FAKE_KEY, fail_result, figures, partial_result, pass_result

from echo_env.cachetest.fleet_run import join_decisions
from echo_env.cachetest.results import TestResult
from echo_env.cli import main
from echo_env.measure.figures import HitRate
from echo_env.report import RunWriter, format_console
from echo_env.report.html import REPORT_FILE, render_html
from echo_env.report.redact import redact_text
from echo_env.report.summary_load import result_from_summary

# ----- fixtures: summaries of each kind of run -------------------------------------------


def fleet_result(out_dir: Path) -> TestResult:
    """PASS through a router: the cache checks of a PASS run joined with a routing PASS over two replicas."""
    result = pass_result(out_dir)
    fleet = routed(((8, 3600, 2880), (7, 3400, 2720)))
    on = result.runs[0]
    result.runs = [dataclasses.replace(on, fleet=fleet, decision=join_decisions(on.decision, fleet.decision))]
    result.on_vs_off = ()
    return result


def turns_result(out_dir: Path) -> TestResult:
    """A PASS whose episodes ran three turns: turn1 and turn2 reuse the history."""
    result = fail_result(out_dir)
    turns = (
        figures("turn1", n=16, counters=0.71, reported=0.70, ceiling=0.74),
        figures("turn2", n=16, counters=0.80, reported=0.79, ceiling=0.83),
    )
    on = result.runs[0]
    evidence = dataclasses.replace(on.evidence, turns=turns)
    result.runs = [dataclasses.replace(on, evidence=evidence, pooled=(*on.pooled, *turns))]
    return result


KINDS = {"pass": pass_result, "fail": fail_result, "partial": partial_result, "fleet": fleet_result}


class Page(HTMLParser):
    """The page's elements with a data-* attribute or an id, and its text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_attr(self, name: str) -> list[dict[str, str]]:
        return [a for _, a in self.tags if name in a]

    def ids(self) -> set[str]:
        return {a["id"] for a in self.with_attr("id")}

    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def page_of(result: TestResult) -> tuple[dict[str, Any], Page, str]:
    summary = json.loads(json.dumps(result.to_json()))
    html = render_html(summary)
    return summary, Page(html), html


# ----- structure -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_page_is_self_contained_and_shows_the_verdict_and_every_check(kind: str, tmp_path: Path) -> None:
    summary, page, html = page_of(KINDS[kind](tmp_path))
    verdict = page.with_attr("data-verdict")[0]
    assert verdict["id"] == "verdict" and verdict["data-verdict"] == summary["verdict"]
    assert " ".join(redact_text(summary["reason"]).split()) in page.words()
    shown = [a["data-check"] for a in page.with_attr("data-check")]
    names = [c["name"] for c in summary["checks"]]
    assert set(names) <= set(shown) and names
    assert "<script" not in html and not re.search(r"""(src|href)=["']?https?:""", html)
    assert FAKE_KEY not in html


def test_a_pass_reads_top_down_with_plots_server_and_cache_off(tmp_path: Path) -> None:
    _, page, html = page_of(pass_result(tmp_path))
    order = [i for i in ("verdict", "headline", "checks", "plots", "server", "phases", "on-vs-off") if i in page.ids()]
    assert order == ["verdict", "headline", "checks", "plots", "server", "phases", "on-vs-off"]
    assert [html.index(f'id="{i}"') for i in order] == sorted(html.index(f'id="{i}"') for i in order)
    plots = {a["data-plot"] for t, a in page.tags if t == "figure"}
    assert plots == {"hit_rate", "ttft_by_phase", "ttft_repeats", "ttft_per_repeat"}
    assert html.count("<svg") == 4 and "stopped" not in page.ids()
    words = page.words()
    assert "PASS needs the interval above 1.20x" in words and "10.62x" in words
    assert "cache on vs off: warm burst TTFT p50" in words and "11.10x" in words
    # The cache-off server's own verdict and checks are on the page too.
    assert "caching_enabled" in {a["data-check"] for a in page.with_attr("data-check")}
    assert "checks-cache_off" in page.ids()


def test_a_fail_marks_the_deciding_check_and_its_figures(tmp_path: Path) -> None:
    _, page, html = page_of(fail_result(tmp_path))
    decisive = [a for a in page.with_attr("data-check") if a["data-check"] == "hits_reach_ceiling"]
    assert decisive[0]["data-outcome"] == "fail"
    assert "(decided the verdict)" in page.words()
    assert "warm hit rate 0.410 (counters) vs ceiling 0.980: 42%" in page.words()
    assert "v-FAIL" in html and "on-vs-off" not in page.ids()


def test_a_run_that_stopped_says_what_it_measured_and_why(tmp_path: Path) -> None:
    summary, page, html = page_of(partial_result(tmp_path))
    assert summary["partial"] and summary["verdict"] == "UNKNOWN"
    assert "stopped" in page.ids()
    words = page.words()
    assert "Run incomplete. Stopped because: ServerUnreachableError: nothing answered" in words
    assert "Measured before it stopped: 0 phases on 1 server(s)" in words
    # No figures, no empty charts: each plot says it was not measured.
    assert "<svg" not in html and len([a for a in page.with_attr("data-plot") if "noplot" in a["class"]]) == 4


def test_a_run_cut_short_mid_way_names_the_phases_it_measured(tmp_path: Path) -> None:
    result = fail_result(tmp_path)
    on = result.runs[0]
    result.runs = [dataclasses.replace(on, phases=on.phases[:2], pooled=())]
    result.partial, result.error = True, "interrupted (Ctrl-C)"
    _, page, _ = page_of(result)
    words = page.words()
    assert (
        "Stopped because: interrupted (Ctrl-C). Measured before it stopped: 2 phases on 1 server(s) (cold #0, warm #0)"
        in words
    )
    # Its per-repeat figures still fill the phase table and the TTFT plot.
    assert "cold #0" in words and '<figure class="plot" data-plot="ttft_by_phase">' in render_html(result.to_json())


def test_a_fleet_shows_each_replica_and_the_routing_verdict(tmp_path: Path) -> None:
    summary, page, _ = page_of(fleet_result(tmp_path))
    assert summary["fleet"]["verdict"] == "PASS"
    assert {"fleet", "routing-verdict", "checks-routing"} <= page.ids()
    words = page.words()
    assert "http://127.0.0.1:8001 8 53% 0.80" in words and "http://127.0.0.1:8002 7 47% 0.80" in words
    assert "router policy round_robin" in words and "affinity 0.8" in words
    routing = [c["name"] for c in summary["fleet"]["checks"]]
    assert routing and all(name in {a["data-check"] for a in page.with_attr("data-check")} for name in routing)


def test_turns_show_history_reuse_against_its_ceiling(tmp_path: Path) -> None:
    _, page, _ = page_of(turns_result(tmp_path))
    assert "turns" in page.ids()
    words = page.words()
    assert "turn1 16 0.71 0.74 96%" in words and "turn2 16 0.80 0.83 96%" in words


def test_keys_the_page_does_not_know_are_shown_not_dropped(tmp_path: Path) -> None:
    summary = pass_result(tmp_path).to_json()
    summary["answer_evidence"] = {"divergence": {"position": 17, "phase": "warm"}}
    summary["runs"][0]["kv_events"] = {"stored_blocks": 412}
    summary["checks"].append({"name": "answers_agree", "title": "answers agree", "outcome": "pass", "detail": "",
                              "evidence": {"agreeing": 31}})  # fmt: skip
    page = Page(render_html(summary))
    assert "more" in page.ids()
    words = page.words()
    assert "divergence position 17 phase warm" in words and "stored_blocks 412" in words and "agreeing 31" in words
    assert "answers_agree" in {a["data-check"] for a in page.with_attr("data-check")}


def test_a_missing_figure_reads_na_not_zero(tmp_path: Path) -> None:
    result = fail_result(tmp_path)
    on = result.runs[0]
    warm = next(p for p in on.pooled if p.name == "warm")
    blind = dataclasses.replace(warm, hit=HitRate(None, None, 0.98), counters=None)
    result.runs = [dataclasses.replace(on, pooled=(*(p for p in on.pooled if p.name != "warm"), blind))]
    _, page, html = page_of(result)
    # warm, requests, failed, TTFT p50/p90/p99, e2e p50, req/s, then both hit rates n/a and the ceiling.
    assert re.search(r"\bwarm \d+ 0 (\d+\.\d+ ){5}n/a n/a 0\.98", page.words())
    assert ">n/a</text>" in html  # the hit-rate chart writes n/a where a bar would be


# ----- files and the command -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pass", "partial"])
def test_finish_leaves_report_html_made_from_the_summary(kind: str, tmp_path: Path) -> None:
    result = KINDS[kind](tmp_path)
    paths = RunWriter(tmp_path).finish(result)
    assert tmp_path / REPORT_FILE in paths and str(tmp_path / REPORT_FILE) in result.files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / REPORT_FILE).read_text() == render_html(summary)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_console_rebuilt_from_summary_json_is_the_runs(kind: str, tmp_path: Path) -> None:
    result = KINDS[kind](tmp_path)
    summary = json.loads(json.dumps(result.to_json()))
    assert format_console(result_from_summary(summary), ascii_only=True) == format_console(result, ascii_only=True)


def test_report_command_rebuilds_the_page_and_prints_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fail_result(tmp_path)
    RunWriter(tmp_path).finish(result)
    (tmp_path / REPORT_FILE).unlink()
    assert main(["report", str(tmp_path)]) == 1  # exits as the run did: FAIL
    out = capsys.readouterr().out
    assert out.startswith("FAIL  hit rate far under the ceiling") and f"{tmp_path / REPORT_FILE}" in out
    assert 'data-verdict="FAIL"' in (tmp_path / REPORT_FILE).read_text()


@pytest.mark.parametrize("make", ["missing", "empty", "not_json"])
def test_report_without_a_summary_names_the_fix(make: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    if make != "missing":
        folder.mkdir()
    if make == "not_json":
        (folder / "summary.json").write_text("{oops")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("echo-prefix report: error: ") and (
        "out_dir of an `echo-prefix test` run" in err or "rerun" in err
    )


# ----- in a real browser -----------------------------------------------------------------

PROBE = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  const visible = e => { const [w, h] = box(e); return w > 0 && h > 0 && getComputedStyle(e).visibility !== 'hidden'; };
  return {
    verdict: document.querySelector('#verdict .badge').innerText,
    verdictVisible: visible(document.querySelector('#verdict')),
    checks: [...document.querySelectorAll('tr.check')].filter(visible).map(e => e.dataset.check),
    plots: [...document.querySelectorAll('figure.plot svg')].map(e => [e.parentElement.dataset.plot, ...box(e)]),
  };
})()"""

needs_chromium = pytest.mark.skipif(
    chromium_path() is None and os.environ.get("ECHO_ENV_REQUIRE_CHROMIUM") != "1",
    reason="chromium is not installed (make chromium)",
)


def look_at(page: Path, summary: dict[str, Any], screenshot: Path) -> dict[str, Any]:
    """Open ``page`` in Chromium and assert what a user sees; returns what the probe found."""
    view = open_page(page, PROBE, screenshot)
    facts = view.facts
    assert view.errors == []
    assert facts["verdict"] == summary["verdict"] and facts["verdictVisible"]
    assert {c["name"] for c in summary["checks"]} <= set(facts["checks"])
    assert facts["plots"] and all(w > 100 and h > 50 for _, w, h in facts["plots"])
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    return facts


@needs_chromium
@pytest.mark.parametrize("kind", ["pass", "fleet"])
def test_chromium_shows_the_verdict_every_check_and_each_plot(kind: str, tmp_path: Path) -> None:
    result = KINDS[kind](tmp_path)
    RunWriter(tmp_path).finish(result)
    facts = look_at(tmp_path / REPORT_FILE, result.to_json(), tmp_path / "report.png")
    assert {p[0] for p in facts["plots"]} == {"hit_rate", "ttft_by_phase", "ttft_repeats", "ttft_per_repeat"}


@needs_chromium
@pytest.mark.engine
def test_a_real_run_leaves_a_page_chromium_shows(engine: Any, tmp_path: Path) -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.commands.test import run_prefix_test
    from echo_env.config import build

    small = {"batch_size": 2, "group_size": 2, "ttft_burst": 2}
    config = build(PrefixTestConfig, base_url=engine.base_url, out_dir=str(tmp_path), **small)
    result = run_prefix_test(config, show_progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.verdict in ("PASS", "UNKNOWN") and summary["verdict"] == result.verdict
    facts = look_at(tmp_path / REPORT_FILE, summary, tmp_path / "report.png")
    assert "hit_rate" in {p[0] for p in facts["plots"]}
