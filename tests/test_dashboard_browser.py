"""The dashboard in real Chromium (Debian `chromium` driven by playwright, headless, no sandbox) against a
real MLflow server: log in, load every page, change the summary, seeds and metrics and see the table and the
chart follow, reload the permalink, get a field error for a bad spec, submit a tiny spec to kfp's local runner
through the form and see it succeed. Screenshots of each page go to the test's tmp folder (printed). A grep of
every log the run wrote finds no token."""

from __future__ import annotations

import shutil

import pytest
import yaml
from dashboard_env import SPEC_NAME, dashboard_world, serve, write_gate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="Debian chromium is not installed: run `make system-deps`")


def _mean(page, arm: str) -> str:
    return page.get_attribute(f'#compare-table tbody tr[data-arm="{arm}"]', "data-mean")


def test_every_page_in_chromium(synth_root, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    folder = tmp_path_factory.mktemp("dashboard-browser")
    shots = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\nscreenshots: {shots}")
    with dashboard_world(synth_root, folder) as world, serve(world.app, folder / "dashboard.log") as url, \
            sync_playwright() as playwright:
        write_gate(folder / "runs")
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))

        page.goto(f"{url}/")
        assert "/login" in page.url
        page.fill('input[name="token"]', world.tokens["sam"])
        page.click('button[type="submit"]')
        page.wait_for_selector("#ablations")
        assert page.locator(f'#ablations a[href="/ablations/{SPEC_NAME}"]').count() == 1
        page.screenshot(path=str(shots / "ablations.png"), full_page=True)

        # compare: the loss at its final value, then its best value; the chart gains the seeds
        page.goto(f"{url}/ablations/{SPEC_NAME}?metrics=loss")
        page.wait_for_selector('#compare-table tbody tr[data-arm="lr-high"]')
        page.wait_for_selector("#chart canvas")
        final = _mean(page, "lr-low")
        series = int(page.get_attribute("#chart", "data-series"))
        assert series == 6  # per arm: mean, CI high, CI low
        page.select_option("#summary", "best")
        page.wait_for_function(f"document.querySelector('#compare-table tbody tr[data-arm=\"lr-low\"]')"
                               f".dataset.mean !== '{final}'")
        assert float(_mean(page, "lr-low")) < float(final)  # the best loss is below the final one here
        assert "summary=best" in page.url
        page.check("#curve-seeds")
        page.wait_for_function("document.querySelector('#chart').dataset.series === '10'")
        page.check('#metric-chooser input[value="final_loss"]')
        page.wait_for_function("document.querySelectorAll('#compare-table tbody tr').length === 4")
        assert page.locator("#compare-table tbody tr.baseline").count() == 2
        assert "2 of 3" in page.inner_text("#compare-table")
        page.click("#compare-table th:nth-child(4)")  # sort by mean
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        permalink = page.get_attribute("#permalink", "href")
        page.goto(f"{url}{permalink}")
        page.wait_for_selector('#compare-table tbody tr[data-arm="lr-high"]')
        assert page.input_value("#summary") == "best" and page.is_checked("#curve-seeds")
        assert page.locator("#compare-table tbody tr").count() == 4

        run_link = page.locator("details a[href^='/runs/']").first.get_attribute("href")
        page.goto(f"{url}{run_link}")
        page.wait_for_selector("#run-metrics")
        assert "final_loss" in page.inner_text("#run-metrics") and "train.lr" in page.inner_text("#run-config")
        page.screenshot(path=str(shots / "run.png"), full_page=True)

        page.goto(f"{url}/nightly")
        page.wait_for_selector(".gate-regression")
        page.screenshot(path=str(shots / "nightly.png"), full_page=True)

        # submit: a bad spec shows the field error, a tiny one runs on kfp's local runner to the end
        page.goto(f"{url}/submit")
        spec = yaml.safe_load(world.spec.read_text())
        spec.update(name="dash-browser", seeds=[0], arms={"only": {"train.lr": "fast"}}, baseline="only")
        page.fill("#spec-text", yaml.safe_dump(spec))
        page.wait_for_selector("#field-errors li")
        assert "train.lr" in page.inner_text("#field-errors") and "fast" in page.inner_text("#field-errors")
        page.screenshot(path=str(shots / "submit-error.png"), full_page=True)
        spec["arms"] = {"only": {}}
        spec["base"]["tracking"]["experiment"] = "dash-browser"
        page.fill("#spec-text", yaml.safe_dump(spec))
        page.wait_for_selector("#valid")
        assert "1 runs" in page.inner_text("#dry-run")
        page.select_option("#runner", "kfp-local")
        page.click("#submit-button")
        # kfp's local runner starts a process per step: ~90 s on an idle machine, ~200 s on a loaded one
        page.wait_for_selector(".job-status.succeeded, .job-status.failed", timeout=480_000)
        log = page.inner_text("#job-log")
        assert page.locator(".job-status.succeeded").count() == 1, log
        page.screenshot(path=str(shots / "submit.png"), full_page=True)
        page.goto(f"{url}/")
        assert page.locator('#ablations a[href="/ablations/dash-browser"]').count() == 1
        browser.close()
        assert errors == []

    written = [folder / "dashboard.log", folder / "mlflow.log", *folder.glob("jobs/*/log.txt"),
               *folder.glob("runs/**/logs/*.log")]
    text = "\n".join(p.read_text(errors="replace") for p in written if p.is_file())
    assert "GET /api/ablations" in text  # the access log was captured
    assert not [who for who, token in world.tokens.items() if token in text]
    for name in ("ablations", "compare", "run", "nightly", "submit-error", "submit"):
        assert (shots / f"{name}.png").stat().st_size > 5_000
