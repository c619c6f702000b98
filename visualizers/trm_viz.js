// TRM visualizer pages: draw input, prediction and ground truth of one puzzle and step through its ACT steps.
// Data comes from a JSON file written by scripts/run_eval_only.py (<outdir>/visualizer.json, picked from disk) or
// from scripts/serve.py (GET /predict for saved outputs, POST /predict to run the model on a pasted grid).
// Plain browser JavaScript, no build step; every page calls TRMViz.init({task: ...}).
"use strict";

const TRMViz = (() => {
  // Per task: cell colour, cell text and legend. Values are what the JSON holds (Sudoku digits with 0 = blank,
  // maze tokens, ARC colours).
  const ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B",
                       "#7FDBFF", "#85144b"];
  const ARC_NAMES = ["black", "blue", "red", "green", "yellow", "grey", "magenta", "orange", "sky", "maroon"];
  const TASKS = {
    sudoku: {
      cellPx: 34,
      colour: () => "#ffffff",
      text: (v) => (v === 0 ? "" : String(v)),
      legend: [["#ffffff", "blank (0)"], ["#ffffff", "given digit (bold)"], ["#ffffff", "predicted digit (blue)"],
               ["#ffd6d6", "wrong cell (red)"]],
    },
    maze: {
      cellPx: 14,
      colour: (v) => ({0: "#dddddd", 1: "#222222", 2: "#ffffff", 3: "#00AA00", 4: "#FFDC00", 5: "#1E90FF"}[v] || "#ff00ff"),
      text: () => "",
      legend: [["#222222", "wall (1)"], ["#ffffff", "open (2)"], ["#00AA00", "start S (3)"], ["#FFDC00", "goal G (4)"],
               ["#1E90FF", "path (5)"], ["#dddddd", "padding (0)"]],
    },
    arc: {
      cellPx: 18,
      colour: (v) => ARC_COLOURS[v] || "#ff00ff",
      text: () => "",
      legend: ARC_COLOURS.map((c, i) => [c, `${i} ${ARC_NAMES[i]}`]),
    },
  };


  const CSS = `
    body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
    .controls { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; margin-bottom: 8px; }
    .controls input[type=text] { width: 14em; }
    #grid-input { width: 100%; height: 4em; font-family: monospace; }
    #status { margin: 6px 0; color: #333; } #status.error { color: #b00020; font-weight: bold; }
    #grids { display: flex; flex-wrap: wrap; gap: 24px; margin-top: 10px; }
    .panel h3 { margin: 4px 0; font-size: 15px; } .note { font-size: 13px; color: #555; margin-top: 4px; }
    .grid { display: grid; border: 2px solid #333; width: max-content; }
    .cell { box-sizing: border-box; border: 1px solid #ccc; display: flex; align-items: center; justify-content: center;
            font-size: 18px; }
    .grid-maze .cell, .grid-arc .cell { border-color: rgba(128,128,128,0.35); }
    .cell.given { font-weight: bold; color: #000; } .cell.predicted { color: #1565c0; }
    .cell.box-right { border-right: 2px solid #333; } .cell.box-bottom { border-bottom: 2px solid #333; }
    .cell.wrong { outline: 2px solid #e00000; outline-offset: -3px; }
    .grid-sudoku .cell.wrong { background: #ffd6d6 !important; color: #b00020; }
    #legend { margin: 8px 0; } .legend-item { margin-right: 14px; font-size: 13px; white-space: nowrap; }
    .swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #888; vertical-align: middle; margin-right: 4px; }
    #steps { margin-top: 12px; } #step-slider { width: 320px; vertical-align: middle; }
    #q-chart { display: flex; align-items: flex-end; gap: 3px; height: 64px; margin-top: 6px; }
    .q-bar { width: 14px; background: #90caf9; cursor: pointer; } .q-bar.current { background: #1565c0; }
  `;

  // The same controls on every page: load from disk, load from the server, paste a grid, step through ACT steps.
  function buildLayout(heading) {
    const style = document.createElement("style");
    style.textContent = CSS;
    document.head.appendChild(style);
    document.body.innerHTML = `
      <h1>${heading}</h1>
      <div class="controls">
        <label>Outputs file (visualizer.json) <input type="file" id="file" accept=".json,application/json"></label>
        <select id="task-select" style="display:none"><option>sudoku</option><option>maze</option><option>arc</option></select>
      </div>
      <div class="controls">
        <label>Server <input type="text" id="server"></label>
        <button id="load-outputs">Load recorded outputs</button>
        <label>Index <input type="number" id="index" value="0" min="0" style="width:5em"></label>
        <button id="load-index">Get saved prediction</button>
      </div>
      <div class="controls" style="display:block">
        <label>Grid to solve (JSON rows) <textarea id="grid-input" placeholder="[[0,0,3,...],...]"></textarea></label>
        <label>Puzzle identifier (ARC) <input type="text" id="puzzle-id" style="width:10em"></label>
        <button id="use-input">Use shown input</button> <button id="solve">Solve on server</button>
      </div>
      <div id="status"></div>
      <div id="examples" style="display:none">Puzzle <select id="example-select"></select></div>
      <h2 id="title"></h2>
      <div id="legend"></div>
      <div id="grids"></div>
      <div id="steps" style="display:none">
        <button id="prev">&#9664; step</button>
        <input type="range" id="step-slider" min="1" max="1" value="1">
        <button id="next">step &#9654;</button>
        <div id="step-label"></div>
        <div id="q-chart" title="sigmoid(q_halt) per ACT step"></div>
      </div>`;
  }

  const state = {fixedTask: null, doc: null, example: null, step: 0};
  const $ = (id) => document.getElementById(id);

  function status(message, isError) {
    const el = $("status");
    el.textContent = message;
    el.className = isError ? "error" : "";
  }

  function defaultServer() {
    return location.protocol.startsWith("http") ? location.origin : "http://127.0.0.1:8000";
  }

  function sameShape(a, b) {
    return a && b && a.length === b.length && a.every((row, r) => row.length === b[r].length);
  }

  // A grid as DOM: div.grid with one div.cell per value (data-value, data-row, data-col); wrong cells get
  // class "wrong". `compare` is the ground truth to mark against (same shape only).
  function drawGrid(container, grid, task, options) {
    const spec = TASKS[task];
    const el = document.createElement("div");
    el.className = `grid grid-${task}`;
    if (!grid || grid.length === 0 || grid[0].length === 0) {
      el.textContent = "(empty grid)";
      container.appendChild(el);
      return el;
    }
    const rows = grid.length, cols = grid[0].length;
    const px = Math.max(6, Math.min(spec.cellPx, Math.floor(600 / Math.max(rows, cols))));
    el.style.gridTemplateColumns = `repeat(${cols}, ${px}px)`;
    el.dataset.rows = rows;
    el.dataset.cols = cols;
    const compare = options.compare && sameShape(options.compare, grid) ? options.compare : null;
    let wrong = 0;
    grid.forEach((row, r) => row.forEach((v, c) => {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.style.width = cell.style.height = `${px}px`;
      cell.style.background = spec.colour(v);
      cell.textContent = spec.text(v);
      cell.dataset.value = v;
      cell.dataset.row = r;
      cell.dataset.col = c;
      if (task === "sudoku") {
        if (options.given && options.given[r][c] !== 0) cell.classList.add("given");
        else if (options.predicted) cell.classList.add("predicted");
        if (c % 3 === 2 && c < 8) cell.classList.add("box-right");
        if (r % 3 === 2 && r < 8) cell.classList.add("box-bottom");
      }
      if (compare && compare[r][c] !== v) {
        cell.classList.add("wrong");
        wrong += 1;
      }
      el.appendChild(cell);
    }));
    el.dataset.wrong = wrong;
    container.appendChild(el);
    return el;
  }

  function panel(title, grid, task, options) {
    const box = document.createElement("div");
    box.className = "panel";
    const h = document.createElement("h3");
    h.textContent = title;
    box.appendChild(h);
    const g = drawGrid(box, grid, task, options || {});
    if (options && options.compare) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = !sameShape(options.compare, grid) ? "shape differs from the ground truth"
        : (g.dataset.wrong === "0" ? "all cells right" : `${g.dataset.wrong} wrong cells`);
      box.appendChild(note);
    }
    return box;
  }

  function drawLegend(task) {
    const el = $("legend");
    el.innerHTML = "";
    TASKS[task].legend.forEach(([colour, label]) => {
      const item = document.createElement("span");
      item.className = "legend-item";
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(label));
      el.appendChild(item);
    });
  }

  function currentPrediction(example) {
    if (example.steps && example.steps.length) return example.steps[state.step].prediction;
    return example.prediction;
  }

  function render() {
    const example = state.example;
    const task = example.task;
    const grids = $("grids");
    grids.innerHTML = "";
    const steps = example.steps || [];
    const pred = currentPrediction(example);
    const predTitle = steps.length ? `Prediction after ACT step ${state.step + 1}` : "Prediction";
    grids.appendChild(panel("Input", example.input, task, {given: null}));
    grids.appendChild(panel(predTitle, pred, task, {compare: example.label, given: task === "sudoku" ? example.input : null,
                                                   predicted: true}));
    if (example.label) grids.appendChild(panel("Ground truth", example.label, task, {}));
    drawLegend(task);
    const title = [`${task}`, example.index !== null && example.index !== undefined ? `example ${example.index}` : "posted grid",
                   example.puzzle_name && example.puzzle_name !== "<blank>" ? `puzzle ${example.puzzle_name}` : null,
                   example.correct === true ? "solved" : example.correct === false ? "not solved" : null];
    $("title").textContent = title.filter(Boolean).join(" · ");
    renderSteps(steps);
  }

  function renderSteps(steps) {
    const box = $("steps");
    box.style.display = steps.length ? "" : "none";
    if (!steps.length) return;
    const slider = $("step-slider");
    slider.min = 1;
    slider.max = steps.length;
    slider.value = state.step + 1;
    const q = steps[state.step].q_halt;
    $("step-label").textContent = `ACT step ${state.step + 1} / ${steps.length}: halting confidence sigmoid(q_halt) = ${q.toFixed(3)}`;
    const chart = $("q-chart");
    chart.innerHTML = "";
    steps.forEach((s, i) => {
      const bar = document.createElement("div");
      bar.className = "q-bar" + (i === state.step ? " current" : "");
      bar.style.height = `${Math.max(2, Math.round(60 * s.q_halt))}px`;
      bar.title = `step ${s.step}: ${s.q_halt.toFixed(3)}`;
      bar.onclick = () => setStep(i);
      chart.appendChild(bar);
    });
  }

  function setStep(i) {
    const steps = state.example.steps || [];
    state.step = Math.max(0, Math.min(steps.length - 1, i));
    render();
  }

  function checkTask(task) {
    if (!TASKS[task]) throw new Error(`unknown task ${JSON.stringify(task)}`);
    if (state.fixedTask && task !== state.fixedTask) {
      throw new Error(`this is the ${state.fixedTask} page but the data is ${task}: open ${task}_visualizer.html or unified_visualizer.html`);
    }
  }

  function showExample(example, task) {
    checkTask(task);
    state.example = Object.assign({task}, example);
    state.step = Math.max(0, (example.steps || []).length - 1);  // start at the final answer
    render();
  }

  // A runner JSON (many examples) or one server answer (one example).
  function loadDocument(doc, origin) {
    if (doc && doc.format === "trm-act-steps") {
      checkTask(doc.task);
      if (!doc.examples.length) throw new Error("the file holds no recorded puzzles (run_eval_only --record-puzzles)");
      state.doc = doc;
      const select = $("example-select");
      select.innerHTML = "";
      doc.examples.forEach((e, i) => {
        const opt = document.createElement("option");
        opt.value = i;
        opt.textContent = `example ${e.index}${e.correct === true ? " ✓" : e.correct === false ? " ✗" : ""}`;
        select.appendChild(opt);
      });
      $("examples").style.display = "";
      showExample(doc.examples[0], doc.task);
      status(`${origin}: ${doc.examples.length} puzzles, ${doc.task} ${doc.grid_size.join("x")}`);
    } else if (doc && doc.task && doc.input) {
      showExample(doc, doc.task);
      status(`${origin}: ${doc.source === "model" ? "model run on the posted grid" : "saved output"}`);
    } else {
      throw new Error("not a TRM visualizer file: expected visualizer.json from scripts/run_eval_only.py");
    }
  }

  async function fetchJSON(url, options) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({detail: `HTTP ${response.status}`}));
    if (!response.ok) throw new Error(`${response.status}: ${body.detail || JSON.stringify(body)}`);
    return body;
  }

  function serverURL() {
    return ($("server").value || defaultServer()).replace(/\/+$/, "");
  }

  async function guard(action) {
    try {
      await action();
    } catch (err) {
      status(String(err.message || err), true);
    }
  }

  function pageTask() {
    return state.fixedTask || (state.example && state.example.task) || $("task-select").value;
  }

  function init(options) {
    state.fixedTask = options.task || null;
    buildLayout(options.heading || "TRM visualizer");
    $("server").value = defaultServer();
    if (!state.fixedTask) $("task-select").style.display = "";
    $("file").addEventListener("change", (event) => guard(async () => {
      const file = event.target.files[0];
      if (!file) return;
      loadDocument(JSON.parse(await file.text()), file.name);
    }));
    $("load-outputs").onclick = () => guard(async () => loadDocument(await fetchJSON(`${serverURL()}/outputs`), "server"));
    $("load-index").onclick = () => guard(async () => {
      const index = encodeURIComponent($("index").value);
      loadDocument(await fetchJSON(`${serverURL()}/predict?index=${index}&task=${pageTask()}`), "server");
    });
    $("solve").onclick = () => guard(async () => {
      let grid;
      try {
        grid = JSON.parse($("grid-input").value);
      } catch (err) {
        throw new Error("the pasted grid is not JSON: paste rows like [[0,1,2],[3,4,5]]");
      }
      const body = {task: pageTask(), grid};
      const ident = $("puzzle-id").value.trim();
      if (ident) body.puzzle_identifier = /^\d+$/.test(ident) ? Number(ident) : ident;
      loadDocument(await fetchJSON(`${serverURL()}/predict`, {method: "POST", headers: {"Content-Type": "application/json"},
                                                           body: JSON.stringify(body)}), "server");
    });
    $("example-select").onchange = (event) => guard(async () => showExample(state.doc.examples[Number(event.target.value)], state.doc.task));
    $("step-slider").oninput = (event) => setStep(Number(event.target.value) - 1);
    $("prev").onclick = () => setStep(state.step - 1);
    $("next").onclick = () => setStep(state.step + 1);
    $("use-input").onclick = () => {
      if (state.example) $("grid-input").value = JSON.stringify(state.example.input);
    };
    status("Load visualizer.json from disk, or fetch from the server.");
  }

  return {init, loadDocument, setStep, state};
})();
