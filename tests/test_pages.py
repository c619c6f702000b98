"""The four visualizer pages in headless Chromium (Playwright driving Debian's chromium): each loads the runner's
visualizer.json from disk and from a running scripts/serve.py, draws input, prediction and ground truth as DOM
grids with wrong cells marked, and its step-through shows each ACT step's prediction and halting confidence."""

import json
import os
import shutil

import pytest

from test_serve import start_server, stop  # noqa: E402  (tests/ is on sys.path under pytest)

from tests.conftest import REPO

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: bash scripts/test.sh installs it")

PAGES = os.path.join(REPO, "visualizers")
CHROMIUM = os.environ.get("TRM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = os.environ.get("TRM_SCREENSHOTS")  # set to docs/ to refresh the README's pictures


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install -y chromium; .ci/run installs it)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def grid_values(page, panel):
    """Values of the panel-th grid on the page as rows of ints."""
    grid = page.locator(".grid").nth(panel)
    rows, cols = int(grid.get_attribute("data-rows")), int(grid.get_attribute("data-cols"))
    values = [int(v) for v in grid.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.value)")]
    return [values[r * cols:(r + 1) * cols] for r in range(rows)]


def check_example(page, example, kind):
    steps = example["steps"]
    assert page.locator(".grid").count() == 3  # input, prediction, ground truth
    assert grid_values(page, 0) == example["input"]
    assert grid_values(page, 1) == example["prediction"]  # starts at the last step
    assert grid_values(page, 2) == example["label"]
    wrong = sum(p != t for pr, tr in zip(example["prediction"], example["label"]) for p, t in zip(pr, tr))
    assert page.locator(".grid").nth(1).locator(".cell.wrong").count() == wrong
    assert page.locator(f".grid-{kind}").count() == 3
    assert page.locator(".legend-item").count() > 0
    # Step-through: step 1 shows step 1's prediction and q-halt; the label and grid change with the step.
    page.click("#prev")
    page.click("#prev")
    assert grid_values(page, 1) == steps[0]["prediction"]
    assert f"ACT step 1 / {len(steps)}" in page.inner_text("#step-label")
    assert f"{steps[0]['q_halt']:.3f}" in page.inner_text("#step-label")
    page.click("#next")
    assert grid_values(page, 1) == steps[1]["prediction"]
    assert f"{steps[1]['q_halt']:.3f}" in page.inner_text("#step-label")
    assert page.locator(".q-bar").count() == len(steps)


def load_from_disk(page, name, json_path):
    page.goto("file://" + os.path.join(PAGES, name))
    page.set_input_files("#file", json_path)
    page.wait_for_selector(".grid")


PAGE_CASES = [("sudoku_visualizer.html", "trained_sudoku", "sudoku"), ("maze_visualizer.html", "trained_maze", "maze"),
              ("unified_visualizer.html", "trained_sudoku", "sudoku"), ("unified_visualizer.html", "trained_maze", "maze")]


@pytest.mark.parametrize("name,run,kind", PAGE_CASES)
def test_page_loads_runner_json_from_disk(page, request, name, run, kind):
    info = request.getfixturevalue(run)
    json_path = os.path.join(info["outdir"], "visualizer.json")
    with open(json_path) as f:
        doc = json.load(f)
    load_from_disk(page, name, json_path)
    check_example(page, doc["examples"][0], kind)
    # Another recorded puzzle from the list.
    page.select_option("#example-select", "2")
    assert grid_values(page, 0) == doc["examples"][2]["input"]
    if SCREENSHOTS and (name != "unified_visualizer.html" or kind == "maze"):
        page.screenshot(path=os.path.join(SCREENSHOTS, name.replace(".html", ".png")), full_page=True)


def test_page_refuses_another_tasks_file(page, trained_maze):
    load = os.path.join(trained_maze["outdir"], "visualizer.json")
    page.goto("file://" + os.path.join(PAGES, "sudoku_visualizer.html"))
    page.set_input_files("#file", load)
    page.wait_for_selector("#status.error")
    assert "this is the sudoku page but the data is maze" in page.inner_text("#status")
    assert page.locator(".grid").count() == 0


@pytest.fixture(scope="module")
def sudoku_server(trained_sudoku):
    proc, base = start_server(trained_sudoku)
    yield base
    stop(proc)


@pytest.mark.parametrize("name", ["sudoku_visualizer.html", "unified_visualizer.html"])
def test_served_page_gets_saved_and_posted_predictions(page, trained_sudoku, sudoku_server, name):
    with open(os.path.join(trained_sudoku["outdir"], "visualizer.json")) as f:
        doc = json.load(f)
    page.goto(f"{sudoku_server}/{name}")
    assert page.input_value("#server") == sudoku_server  # served: same origin by default
    page.click("#load-outputs")
    page.wait_for_selector(".grid")
    check_example(page, doc["examples"][0], "sudoku")
    # GET /predict by index.
    page.fill("#index", "1")
    page.click("#load-index")
    page.wait_for_function("document.getElementById('status').textContent.includes('saved output')")
    assert grid_values(page, 0) == doc["examples"][1]["input"]
    # POST /predict: the shown input, solved by the model for real.
    page.click("#use-input")
    page.click("#solve")
    page.wait_for_function("document.getElementById('status').textContent.includes('model run')")
    assert grid_values(page, 1) == doc["examples"][1]["prediction"]
    assert page.locator(".grid").count() == 2  # no ground truth for a posted grid
    page.click("#prev")
    assert "ACT step 2 / 3" in page.inner_text("#step-label")
    # A bad grid: the server's message is shown.
    page.fill("#grid-input", "[[1,2],[3,4]]")
    page.click("#solve")
    page.wait_for_selector("#status.error")
    assert "must be 9x9" in page.inner_text("#status")


def test_arc_page_draws_arc_colours(page, tmp_path):
    """The ARC page on a recorded ARC example (written by the same code as the runner's JSON)."""
    steps = [{"step": 1, "prediction": [[1, 2], [3, 3]], "q_halt": 0.1},
             {"step": 2, "prediction": [[1, 2], [3, 4]], "q_halt": 0.9}]
    doc = {"format": "trm-act-steps", "version": 1, "task": "arc", "grid_size": [30, 30], "examples": [
        {"index": 0, "puzzle_identifier": 7, "puzzle_name": "abc|||t0|||0123456789", "input": [[0, 1], [2, 3]],
         "label": [[1, 2], [3, 4]], "prediction": [[1, 2], [3, 4]], "steps": steps, "correct": True},
        {"index": 1, "puzzle_identifier": 8, "puzzle_name": "def", "input": [[5]], "label": [[6]],
         "prediction": [[6]], "steps": steps[:1], "correct": True}]}
    path = tmp_path / "visualizer.json"
    path.write_text(json.dumps(doc))
    load_from_disk(page, "arc_visualizer.html", str(path))
    check_example(page, doc["examples"][0], "arc")
    colour = page.locator(".grid").nth(0).locator(".cell").nth(1).evaluate("c => getComputedStyle(c).backgroundColor")
    assert colour == "rgb(0, 116, 217)"  # ARC colour 1 is blue (#0074D9)
    assert page.locator(".legend-item").count() == 10
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, "arc_visualizer.png"), full_page=True)
