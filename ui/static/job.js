// Job: live curves that grow as epochs commit, spec, stop reason, events, checkpoints, lr_find.
"use strict";
(() => {
  const { api, h, num, fmt, age, labels, status, plot, chartBox, COLORS, showProblem, debounce } = TY;
  const root = document.getElementById("job");
  const jobId = root.dataset.jobId;
  const epochs = new Map();  // epoch -> values
  let job = null;

  const FIELDS = [["Status", (j) => status(j.status)], ["Progress", (j) => `${j.progress.epoch}/${j.progress.epochs} epochs`],
    ["Best", (j) => j.best ? `${fmt(j.best.value)} ${j.best.monitor || ""} @ ${j.best.epoch}` : "–"],
    ["Stop reason", (j) => j.stop_reason || "–"], ["Queue", (j) => j.queue], ["Worker", (j) => j.worker || "–"],
    ["Attempts", (j) => j.attempts], ["Created", (j) => `${age(j.created_at)} ago`],
    ["Run time", (j) => j.run_seconds ? `${j.run_seconds.toFixed(1)} s` : "–"],
    ["Sweep", (j) => j.sweep_id ? h("a", { href: `/ui/sweeps/${j.sweep_id}` }, `trial #${j.trial_number}`) : "–"],
    ["Labels", (j) => Object.keys(j.labels || {}).length ? labels(j.labels) : "–"], ["Notes", (j) => j.notes || "–"]];

  function renderJob(j) {
    job = j;
    document.getElementById("title").textContent = `${j.name} `;
    document.getElementById("title").append(h("span", { class: "hint" }, j.id));
    document.getElementById("summary").replaceChildren(...FIELDS.map(([k, f]) => h("div", {}, h("dt", {}, k), h("dd", {}, f(j)))));
    const problem = document.getElementById("problem");
    problem.hidden = !j.error; problem.textContent = j.error ? `Error: ${j.error}` : "";
    document.getElementById("spec").textContent = JSON.stringify(j.spec, null, 2);
    const cancel = document.getElementById("cancel");
    cancel.hidden = !["queued", "running", "paused"].includes(j.status) || j.cancel_requested;
    const lf = j.info?.lr_find || (j.info?.lrs ? j.info : null);
    if (lf) renderLrFind(lf);
  }

  function renderLrFind(lf) {
    document.getElementById("lrfind").hidden = false;
    const traces = [{ x: lf.lrs, y: lf.losses, name: "loss (smoothed)", mode: "lines", line: { color: COLORS[0] } }];
    const shapes = [];
    if (lf.suggested_learning_rate) {
      shapes.push({ type: "line", x0: lf.suggested_learning_rate, x1: lf.suggested_learning_rate, yref: "paper", y0: 0, y1: 1,
                    line: { color: COLORS[1], dash: "dash" } });
    }
    plot(document.getElementById("lrfind-chart"), traces, { title: { text: `loss vs learning rate — suggested ${fmt(lf.suggested_learning_rate)}` },
      xaxis: { type: "log", title: { text: "learning rate" } }, yaxis: { title: { text: "loss" } }, shapes });
  }

  // one chart per family: loss+val_loss, each metric with its val_ twin, the learning rate
  function families() {
    const keys = new Set(); for (const e of epochs.values()) for (const k of Object.keys(e)) keys.add(k);
    keys.delete("epoch"); keys.delete("seconds");
    const out = [];
    const base = [...keys].filter((k) => !k.startsWith("val_") && k !== "lr");
    for (const k of [...keys].filter((k) => k.startsWith("val_") && !keys.has(k.slice(4)))) base.push(k);
    for (const k of base.sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)))) {
      out.push([k, [k, `val_${k}`].filter((x) => keys.has(x))]);
    }
    if (keys.has("lr")) out.push(["lr", ["lr"]]);
    return out;
  }

  const draw = () => {
    const container = document.getElementById("charts");
    const rows = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const x = rows.map((e) => e.epoch);
    for (const [name, keys] of families()) {
      const el = chartBox(container, `chart-${name}`, `${name} by epoch`);
      const log = name === "lr" && document.getElementById("lrlog").checked;
      plot(el, keys.map((k, i) => ({ x, y: rows.map((e) => num(e[k])), name: k, mode: "lines+markers",
                                      line: { color: COLORS[i] }, marker: { size: 5 } })),
           { title: { text: name === "lr" ? "learning rate" : name }, xaxis: { title: { text: "epoch" } },
             yaxis: { type: log ? "log" : "linear" } });
      el.dataset.points = String(x.length);
    }
    // when each epoch count reached the page (the browser tests compare it with the commit time)
    (window.tyDrawnAt ||= {})[x.length] ??= Date.now();
  };
  // epochs that arrive together are drawn together, on the next frame
  let frame = 0;
  const drawSoon = () => { if (!frame) frame = requestAnimationFrame(() => { frame = 0; draw(); }); };
  document.getElementById("lrlog").onchange = draw;

  async function loadCheckpoints() {
    const { checkpoints } = await api(`/v1/jobs/${jobId}/checkpoints`);
    document.querySelector("#checkpoints tbody").replaceChildren(...checkpoints.map((c) => h("tr", {},
      h("td", {}, c.epoch), h("td", {}, c.step), h("td", {}, c.monitor || "–"), h("td", { class: "num" }, fmt(c.value)),
      h("td", { class: "num" }, `${(c.size / 1024).toFixed(1)} KiB`), h("td", {}, c.is_best ? "best" : ""),
      h("td", {}, c.is_best && c.stored ? h("a", { href: `/v1/jobs/${jobId}/checkpoints/best`, download: "" }, "safetensors") : "–"))));
  }
  const refresh = debounce(async () => { renderJob(await api(`/v1/jobs/${jobId}`)); loadCheckpoints(); }, 200);

  function addEvent(kind, data, id) {
    const list = document.getElementById("events");
    const text = kind === "epoch" ? `epoch ${data.epoch}: loss ${fmt(num(data.loss))}${data.val_loss !== undefined ? `, val_loss ${fmt(num(data.val_loss))}` : ""}`
      : `${data.status}${data.stop_reason ? ` (${data.stop_reason})` : ""}${data.reason ? ` — ${data.reason}` : ""}${data.error ? `: ${data.error}` : ""}`;
    list.prepend(h("li", { "data-id": id }, h("strong", {}, kind), " ", text));
  }

  document.getElementById("cancel").onclick = async () => {
    if (!confirm("Cancel this job?")) return;
    try { renderJob(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" })); } catch (e) { showProblem(e); }
  };

  (async () => {
    try { renderJob(await api(`/v1/jobs/${jobId}`)); } catch (e) { showProblem(e); return; }
    loadCheckpoints();
    // the job's own stream: its backlog (every event so far) then each new one as it commits
    const live = document.getElementById("live");
    live.hidden = false;
    const src = new EventSource(`/v1/jobs/${jobId}/events`);
    src.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
    src.onerror = () => {
      if (job && ["succeeded", "failed", "cancelled"].includes(job.status)) { src.close(); live.textContent = "ended"; live.classList.remove("on"); }
      else { live.textContent = "reconnecting"; live.classList.remove("on"); }
    };
    src.addEventListener("epoch", (e) => { const d = JSON.parse(e.data); epochs.set(d.epoch, d); addEvent("epoch", d, e.lastEventId); drawSoon(); });
    src.addEventListener("state", (e) => { const d = JSON.parse(e.data); addEvent("state", d, e.lastEventId); refresh(); });
  })();
})();
