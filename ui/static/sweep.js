// Sweep: leaderboard, parallel coordinates, optimization history, intermediate values with rungs.
"use strict";
(() => {
  const { api, h, num, fmt, status, plot, COLORS, showProblem, events, debounce, labels } = TY;
  const sweepId = document.getElementById("sweep").dataset.sweepId;

  function rungs(et) {
    // the epochs at which early termination compares trials (min_epochs · reduction_factor^k)
    if (!et || !["asha", "hyperband"].includes(et.type)) return [];
    const out = []; for (let r = et.min_epochs; r < et.max_epochs; r *= et.reduction_factor) out.push(r);
    return out;
  }

  async function load() {
    const s = await api(`/v1/sweeps/${sweepId}`);
    const metric = s.objective.metric;
    document.getElementById("title").textContent = `${s.name} `;
    document.getElementById("title").append(h("span", { class: "hint" }, s.id));
    const summary = [["Status", status(s.status)], ["Method", s.method], ["Objective", `${s.objective.mode} ${metric}`],
      ["Trials", `${s.counts.total} of ${s.max_trials}`], ["Running", s.counts.running], ["Paused", s.counts.paused],
      ["Pruned", s.counts.pruned], ["Best", fmt(s.best_value)], ["Stop reason", s.stop_reason || "–"],
      ["Labels", Object.keys(s.labels || {}).length ? labels(s.labels) : "–"]];
    document.getElementById("summary").replaceChildren(...summary.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    if (s.error) showProblem(s.error);

    const params = [...new Set(s.trials.flatMap((t) => Object.keys(t.params)))];
    const board = document.getElementById("board");
    board.tHead.replaceChildren(h("tr", {}, ...["Rank", "Trial", "Status", metric, "Epochs", ...params].map((c) => h("th", { scope: "col" }, c))));
    board.tBodies[0].replaceChildren(...s.leaderboard.map((t, i) => h("tr", {},
      h("td", {}, i + 1), h("td", {}, h("a", { href: `/ui/jobs/${t.job_id}` }, `#${t.number}`)),
      h("td", {}, status(t.status), t.stop_reason === "pruned" ? " (pruned)" : ""), h("td", { class: "num" }, fmt(t.value)),
      h("td", {}, `${t.epochs_run}/${t.epochs}`), ...params.map((p) => h("td", {}, JSON.stringify(t.params[p]))))));

    // parallel coordinates: each parameter (categories as indexes) and the objective
    const scored = s.trials.filter((t) => num(t.value) !== null && Number.isFinite(num(t.value)));
    const dims = params.map((p) => {
      const vals = scored.map((t) => t.params[p]);
      if (vals.every((v) => typeof v === "number")) {
        const log = vals.every((v) => v > 0) && Math.max(...vals) / Math.min(...vals) > 100;
        return log ? { label: `log10 ${p}`, values: vals.map(Math.log10) } : { label: p, values: vals };
      }
      const cats = [...new Set(vals.map((v) => JSON.stringify(v)))];
      return { label: p, values: vals.map((v) => cats.indexOf(JSON.stringify(v))), tickvals: cats.map((_, i) => i), ticktext: cats };
    });
    const obj = scored.map((t) => num(t.value));
    const par = document.getElementById("parallel");
    plot(par, [{ type: "parcoords", dimensions: [...dims, { label: metric, values: obj }],
                 line: { color: obj, colorscale: "Viridis", reversescale: s.objective.mode === "min", showscale: true } }],
         { margin: { l: 70, r: 40, t: 70, b: 30 } });
    par.dataset.trials = String(scored.length);

    // optimization history: each trial's value by trial number, and the best so far
    const byNumber = [...scored].sort((a, b) => a.number - b.number);
    let best = null; const bestSoFar = byNumber.map((t) => {
      const v = num(t.value); best = best === null ? v : (s.objective.mode === "min" ? Math.min(best, v) : Math.max(best, v)); return best; });
    const hist = document.getElementById("history");
    plot(hist, [{ x: byNumber.map((t) => t.number), y: byNumber.map((t) => num(t.value)), mode: "markers", name: "trial",
                  marker: { color: COLORS[0], size: 8 }, text: byNumber.map((t) => `#${t.number}`) },
                { x: byNumber.map((t) => t.number), y: bestSoFar, mode: "lines", name: "best so far", line: { color: COLORS[1], shape: "hv" } }],
         { xaxis: { title: { text: "trial" } }, yaxis: { title: { text: metric } } });
    hist.dataset.trials = String(byNumber.length);

    // intermediate values: every trial's objective by epoch, rungs and paused/pruned trials marked
    const ids = s.trials.map((t) => ({ id: t.job_id }));
    const curves = ids.length ? await api("/v1/metrics/bulk", { method: "POST", body: { jobs: ids, keys: [metric] } }) : { jobs: {} };
    const traces = [];
    s.trials.forEach((t, i) => {
      const ep = curves.jobs[t.job_id]?.epochs || [];
      const x = ep.map((e) => e.epoch), y = ep.map((e) => num(e[metric]));
      traces.push({ x, y, mode: "lines", name: `#${t.number}`, line: { color: COLORS[i % COLORS.length], width: 1.5 } });
      const mark = t.status === "paused" ? "diamond" : t.stop_reason === "pruned" ? "x" : null;
      if (mark && x.length) traces.push({ x: [x[x.length - 1]], y: [y[y.length - 1]], mode: "markers", showlegend: false,
        name: `#${t.number} ${t.status === "paused" ? "paused" : "pruned"}`, marker: { symbol: mark, size: 11, color: COLORS[i % COLORS.length] } });
    });
    const shapes = rungs(s.config?.early_termination).map((r) => ({ type: "line", x0: r, x1: r, yref: "paper", y0: 0, y1: 1,
      line: { color: "#6b7280", dash: "dot", width: 1 } }));
    const inter = document.getElementById("intermediate");
    plot(inter, traces, { xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: metric } }, shapes, showlegend: s.trials.length <= 12 });
    inter.dataset.trials = String(s.trials.length);
  }
  const reload = debounce(() => load().catch(showProblem), 400);
  events({ sweep: (c) => { if (c.sweep_id === sweepId) reload(); } });
  load().catch(showProblem);
})();
