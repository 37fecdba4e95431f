// The dashboard's browser side: the compare page (table, curves, permalink), the submit page (live
// validation, dry run, jobs) and the nightly trends. Everything comes from the JSON API; charts are uPlot.
"use strict";
const dashboard = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const num = (x, d = 4) => (x === null || x === undefined ? "n/a" : Number(x).toPrecision(d));
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

  async function api(path, options = {}) {
    const headers = {"Accept": "application/json", ...(options.body ? {"Content-Type": "application/json", "X-CSRF-Token": csrf()} : {})};
    const response = await fetch(path, {credentials: "same-origin", ...options, headers});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(typeof body.detail === "string" ? body.detail : (body.detail?.message || response.statusText)), {status: response.status, body});
    return body;
  }

  function localTimes() {
    document.querySelectorAll(".time[data-ms]").forEach((el) => {
      if (el.dataset.ms) el.textContent = new Date(Number(el.dataset.ms)).toLocaleString();
    });
  }

  // ---- compare page -------------------------------------------------------------------------------
  function comparePage(name) {
    const params = new URLSearchParams(location.search);
    const state = {metrics: params.get("metrics") || "", summary: params.get("summary") || "final", at: params.get("at") || "",
                   baseline: params.get("baseline") || "", curve: params.get("curve") || "", x: params.get("x") || "step",
                   seeds: params.get("seeds") === "1"};
    let chart = null, data = null;
    const $ = (id) => document.getElementById(id);
    $("summary").value = state.summary; $("at").value = state.at; $("curve-x").value = state.x; $("curve-seeds").checked = state.seeds;

    function query() {
      const q = new URLSearchParams();
      if (state.metrics) q.set("metrics", state.metrics);
      q.set("summary", state.summary);
      if ((state.summary === "step" || state.summary === "samples") && state.at !== "") q.set("at", state.at);
      if (state.baseline) q.set("baseline", state.baseline);
      return q;
    }
    function permalink() {
      const q = query();
      if (state.curve) q.set("curve", state.curve);
      q.set("x", state.x); if (state.seeds) q.set("seeds", "1");
      const url = `${location.pathname}?${q}`;
      history.replaceState(null, "", url);
      $("permalink").href = url;
      for (const fmt of ["md", "csv", "tex"]) $(`export-${fmt}`).href = `/api/ablations/${encodeURIComponent(name)}/export.${fmt}?${query()}`;
    }

    async function load() {
      $("at-label").hidden = !(state.summary === "step" || state.summary === "samples");
      if (!$("at-label").hidden && state.at === "") { $("status").textContent = "give a step / sample count"; return; }
      $("status").textContent = "loading…";
      try {
        data = await api(`/api/ablations/${encodeURIComponent(name)}/compare?${query()}`);
      } catch (err) {
        $("status").innerHTML = `<span class="error">${esc(err.message)}</span>`; return;
      }
      $("status").textContent = `summary: ${data.summary}${data.at !== null ? " at " + data.at : ""} · ${data.arms.length} arms · Holm over ${data.holm.family_size} tests`;
      renderChooser(); renderTable(); renderDiff(); renderNotes(); permalink();
      const curveSelect = $("curve-metric");
      if (!curveSelect.options.length) {
        for (const m of data.available_metrics) curveSelect.add(new Option(m, m));
        state.curve = state.curve || (data.available_metrics.includes("loss") ? "loss" : data.metrics[0]);
        curveSelect.value = state.curve;
      }
      drawCurve();
    }

    function renderChooser() {
      const box = $("metric-chooser");
      if (!box.querySelector("input")) {
        const chosen = new Set(data.metrics);
        box.innerHTML = "<legend>metrics</legend>" + data.available_metrics.map((m) =>
          `<label><input type="checkbox" value="${esc(m)}" ${chosen.has(m) ? "checked" : ""}> ${esc(m)}</label>`).join("");
        box.addEventListener("change", () => {
          state.metrics = [...box.querySelectorAll("input:checked")].map((i) => i.value).join(","); load();
        });
      }
      const base = $("baseline");
      if (!base.options.length) {
        for (const arm of data.arms) base.add(new Option(arm, arm));
      }
      base.value = data.baseline;
    }

    function nText(c) { const planned = c.n + c.missing_seeds.length; return planned === c.n ? `${c.n}` : `${c.n} of ${planned}`; }
    const COLUMNS = [["metric", (c) => c.metric], ["arm", (c) => c.arm], ["n", (c) => c.n], ["mean ± std", (c) => c.mean],
      ["95 % CI", (c) => c.mean_ci_low], ["Δ vs baseline [95 % CI]", (c) => c.delta], ["test", (c) => c.test],
      ["p", (c) => c.p], ["p_holm", (c) => c.p_holm], ["effect size", (c) => c.effect_size]];
    let sortKey = null, sortDir = 1;

    function renderTable() {
      const table = $("compare-table");
      table.tHead.innerHTML = "<tr>" + COLUMNS.map(([h], i) => `<th data-col="${i}">${esc(h)}${sortKey === i ? (sortDir > 0 ? " ▲" : " ▼") : ""}</th>`).join("") + "</tr>";
      table.tHead.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
        const i = Number(th.dataset.col); sortDir = sortKey === i ? -sortDir : 1; sortKey = i; renderTable();
      }));
      let cells = data.cells.slice();
      if (sortKey !== null) {
        const key = COLUMNS[sortKey][1];
        cells.sort((a, b) => { const x = key(a), y = key(b); if (x === y) return 0; if (x === null) return 1; if (y === null) return -1; return (x < y ? -1 : 1) * sortDir; });
      }
      table.tBodies[0].innerHTML = cells.map((c) => {
        const base = c.arm === data.baseline;
        const effect = c.effect_size === null ? "n/a" : `${c.effect_size_kind === "cohens_dz" ? "d_z" : "g"} ${c.effect_size.toFixed(2)}`;
        const missing = c.missing_seeds.length ? ` <span class="small">(missing seeds ${c.missing_seeds.join(",")})</span>` : "";
        return `<tr class="${base ? "baseline" : ""} ${c.significant ? "significant" : ""}" data-arm="${esc(c.arm)}" data-metric="${esc(c.metric)}" data-mean="${c.mean ?? ""}" data-p-holm="${c.p_holm ?? ""}">
          <td>${esc(c.metric)}</td><td>${esc(c.arm)}${base ? " (baseline)" : ""}${c.preliminary ? ' <span class="warning small">preliminary</span>' : ""}</td>
          <td class="num n">${nText(c)}${missing}</td><td class="num mean">${esc(c.mean_text)}</td>
          <td class="num">${c.mean_ci_low === null ? "n/a" : `[${num(c.mean_ci_low)}, ${num(c.mean_ci_high)}]`}</td>
          <td class="num delta">${esc(c.delta_text)}</td><td>${base ? "" : esc(c.test)}</td>
          <td class="num">${base ? "" : num(c.p, 2)}</td><td class="num p-holm">${base ? "" : esc(c.p_holm_text)}</td><td class="num">${base ? "" : effect}</td></tr>`;
      }).join("");
    }

    function renderDiff() {
      const diff = data.config_diff, table = $("config-diff"), arms = Object.keys(diff.arms);
      table.tHead.innerHTML = "<tr><th>key</th>" + arms.map((a) => `<th>${esc(a)}</th>`).join("") + "</tr>";
      table.tBodies[0].innerHTML = diff.keys.length ? diff.keys.map((k) => `<tr><td><code>${esc(k)}</code></td>` +
        arms.map((a) => `<td><code>${esc(diff.arms[a][k])}</code></td>`).join("") + "</tr>").join("")
        : `<tr><td colspan="${arms.length + 1}">no config key differs between arms</td></tr>`;
    }

    function renderNotes() {
      const mismatch = data.protocols.mismatch;
      $("protocol").hidden = !mismatch.length;
      $("protocol").textContent = mismatch.length ? `Arms were evaluated under different protocols (${mismatch.join(", ")} differ): the comparison is not like for like.` : "";
      $("preliminary").hidden = !data.preliminary_arms.length;
      $("preliminary").textContent = data.preliminary_arms.length ? `Preliminary: ${data.preliminary_arms.join(", ")} ha${data.preliminary_arms.length > 1 ? "ve" : "s"} fewer than 3 finished seeds.` : "";
      const lines = data.missing_runs.map((r) => `${esc(r.arm)} seed ${r.seed}: ${esc(r.reason)}`)
        .concat(data.skipped_runs.map((r) => `${esc(r.arm)} seed ${r.seed}: ${esc(r.reason)} (run ${esc(r.run_id)})`));
      $("missing").innerHTML = lines.length ? "Not in the numbers: <ul><li>" + lines.join("</li><li>") + "</li></ul>" : "";
    }

    async function drawCurve() {
      permalink();
      let curve;
      try {
        curve = await api(`/api/ablations/${encodeURIComponent(name)}/curves?metric=${encodeURIComponent(state.curve)}&x=${state.x}&seeds=${state.seeds}`);
      } catch (err) { $("chart").innerHTML = `<span class="error">${esc(err.message)}</span>`; return; }
      const series = [{label: state.x}], columns = [curve.x], bands = [];
      curve.arms.forEach((arm, i) => {
        const color = COLORS[i % COLORS.length];
        columns.push(arm.mean); series.push({label: `${arm.arm} (mean of ${arm.n_seeds})`, stroke: color, width: 2, spanGaps: true});
        columns.push(arm.ci_high); series.push({label: `${arm.arm} 95% CI high`, stroke: "transparent", spanGaps: true});
        columns.push(arm.ci_low); series.push({label: `${arm.arm} 95% CI low`, stroke: "transparent", spanGaps: true});
        bands.push({series: [columns.length - 2, columns.length - 1], fill: color + "33"});
        for (const [seed, values] of Object.entries(arm.seeds || {})) {
          columns.push(values); series.push({label: `${arm.arm} seed ${seed}`, stroke: color + "88", width: 1, dash: [4, 3], spanGaps: true});
        }
      });
      const el = $("chart"); el.innerHTML = "";
      el.dataset.series = String(series.length - 1);
      el.dataset.points = String(curve.x.length);
      const resumes = curve.arms.flatMap((a) => a.resumes);
      chart = new uPlot({width: Math.min(1000, window.innerWidth - 60), height: 360, series, bands, scales: {x: {time: false}},
        axes: [{label: state.x === "step" ? "step" : "samples seen"}, {label: curve.metric}],
        hooks: {draw: [(u) => { // resume markers: a dashed vertical line where a run restarted
          const ctx = u.ctx; ctx.save(); ctx.strokeStyle = "#999"; ctx.setLineDash([2, 4]);
          for (const r of resumes) { const x = u.valToPos(r, "x", true); ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); }
          ctx.restore(); }]}}, columns, el);
    }

    $("summary").addEventListener("change", (e) => { state.summary = e.target.value; load(); });
    $("at").addEventListener("change", (e) => { state.at = e.target.value; load(); });
    $("baseline").addEventListener("change", (e) => { state.baseline = e.target.value; load(); });
    $("curve-metric").addEventListener("change", (e) => { state.curve = e.target.value; drawCurve(); });
    $("curve-x").addEventListener("change", (e) => { state.x = e.target.value; drawCurve(); });
    $("curve-seeds").addEventListener("change", (e) => { state.seeds = e.target.checked; drawCurve(); });
    load();
  }

  // ---- submit page --------------------------------------------------------------------------------
  function submitPage() {
    const $ = (id) => document.getElementById(id);
    let timer = null, polling = null;

    async function validate() {
      const text = $("spec-text").value;
      if (!text.trim()) { $("validation").textContent = ""; return null; }
      const result = await api("/api/specs/validate", {method: "POST", body: JSON.stringify({text})});
      $("validation").innerHTML = result.valid ? '<span class="done" id="valid">valid spec</span>' :
        '<ul id="field-errors">' + result.errors.map((e) => `<li class="field-error"><code>${esc(e.path || "spec")}</code>: ${esc(e.message)}</li>`).join("") + "</ul>";
      const dry = result.dry_run;
      $("dry-run").innerHTML = !dry ? "fix the errors above to see the dry run" :
        `<p><b>${esc(dry.name)}</b>: ${Object.keys(dry.arms).length} arms x ${dry.seeds.length} seeds = ${dry.runs.length} runs; baseline ${esc(dry.baseline)}` +
        (dry.estimate ? `; estimate ${(dry.estimate.total_s / 60).toFixed(1)} min (${dry.estimate.per_run_s.toFixed(1)} s per run, measured on ${dry.estimate.from_runs} earlier runs)` : "; no earlier runs to estimate the cost from") + "</p>" +
        (dry.prepare.length ? "<p>prepare steps: " + dry.prepare.map((p) => `<code>${esc(p.kind)}</code>`).join(", ") + "</p>" : "<p>no prepare steps</p>") +
        '<table class="grid" id="dry-run-table"><thead><tr><th>arm</th><th>seed</th><th>steps</th><th>run folder</th></tr></thead><tbody>' +
        dry.runs.map((r) => `<tr><td>${esc(r.arm)}</td><td>${r.seed}</td><td>${r.max_steps ?? r.epochs + " epoch(s)"}</td><td><code>${esc(r.run_dir)}</code></td></tr>`).join("") + "</tbody></table>";
      return result;
    }
    $("spec-text").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(validate, 400); });
    $("spec-file").addEventListener("change", async (e) => {
      if (!e.target.value) return;
      $("spec-text").value = (await api(`/api/specs/${encodeURIComponent(e.target.value)}`)).text; validate();
    });

    function jobRow(job) {
      let row = document.querySelector(`#jobs tr[data-job="${job.id}"]`);
      if (!row) { row = document.querySelector("#jobs tbody").insertRow(0); row.dataset.job = job.id; }
      row.innerHTML = `<td><code>${esc(job.id)}</code></td><td><a href="/ablations/${encodeURIComponent(job.ablation)}">${esc(job.ablation)}</a></td><td>${esc(job.runner)}</td>` +
        `<td class="job-status ${esc(job.status)}">${esc(job.status)}</td><td>${new Date(job.started * 1000).toLocaleString()}</td>` +
        `<td>${job.status === "running" ? `<button class="cancel" data-job="${esc(job.id)}">cancel</button>` : ""}</td>`;
    }
    async function follow(id) {
      clearInterval(polling);
      const tick = async () => {
        const job = await api(`/api/jobs/${id}`);
        jobRow(job); $("job-log").textContent = job.log; $("job-log").scrollTop = 1e9;
        if (job.status !== "running") clearInterval(polling);
      };
      polling = setInterval(tick, 1000); tick();
    }
    $("submit-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      $("submit-button").disabled = true;
      try {
        const result = await api("/api/submit", {method: "POST", body: JSON.stringify({text: $("spec-text").value, target: $("target").value, runner: $("runner").value})});
        if (result.job) { jobRow(result.job); follow(result.job.id); }
        else $("validation").innerHTML = `<span class="done">submitted to KFP: run ${esc(result.run_id)}</span>`;
      } catch (err) {
        const errors = err.body?.detail?.errors;
        $("validation").innerHTML = errors ? '<ul id="field-errors">' + errors.map((x) => `<li class="field-error"><code>${esc(x.path || "spec")}</code>: ${esc(x.message)}</li>`).join("") + "</ul>"
          : `<span class="error">${esc(err.message)}</span>`;
      } finally { $("submit-button").disabled = false; }
    });
    document.getElementById("jobs").addEventListener("click", async (e) => {
      if (e.target.classList.contains("cancel")) jobRow(await api(`/api/jobs/${e.target.dataset.job}/cancel`, {method: "POST", body: "{}"}));
      else if (e.target.closest("tr[data-job]")) follow(e.target.closest("tr[data-job]").dataset.job);
    });
    localTimes();
  }

  // ---- nightly page -------------------------------------------------------------------------------
  function nightlyPage() {
    document.querySelectorAll(".trends").forEach((box) => {
      const trends = JSON.parse(box.dataset.trends);
      for (const [key, trend] of Object.entries(trends)) {
        const valid = trend.points.filter((p) => p.value !== null && p.value !== undefined);
        if (!valid.length) continue;
        const div = document.createElement("div"); div.className = "trend"; box.appendChild(div);
        const [low, high] = trend.band, x = valid.map((p) => p.time_ms / 1000);
        const series = [{}, {label: "value", stroke: COLORS[0], points: {show: true}}];
        const columns = [x, valid.map((p) => p.value)];
        if (low !== null) { // today's tolerance band around the gate's baseline
          series.push({label: "band low", stroke: "#b00", dash: [5, 4]}, {label: "band high", stroke: "#b00", dash: [5, 4]});
          columns.push(x.map(() => low), x.map(() => high));
        }
        new uPlot({title: key.replace("|", " · "), width: 460, height: 200, scales: {x: {time: true}}, series}, columns, div);
      }
    });
  }

  return {api, localTimes, comparePage, submitPage, nightlyPage};
})();
