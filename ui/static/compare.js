// Compare 2–10 jobs: overlaid curves per metric and the spec fields that differ.
"use strict";
(() => {
  const { api, h, num, fmt, status, plot, chartBox, COLORS, showProblem, events, debounce } = TY;
  const ids = (new URLSearchParams(location.search).get("ids") || "").split(",").filter(Boolean);

  function flatten(value, prefix = "", out = {}) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
    } else if (Array.isArray(value) && value.some((v) => v && typeof v === "object")) {
      value.forEach((v, i) => flatten(v, `${prefix}[${i}]`, out));
    } else out[prefix] = JSON.stringify(value);
    return out;
  }

  async function load() {
    if (ids.length < 2 || ids.length > 10) { showProblem("Choose 2 to 10 jobs to compare (?ids=a,b)."); return; }
    const [{ jobs: summaries }, metrics] = await Promise.all([
      api("/v1/jobs", { query: { id: ids, limit: ids.length } }),
      api("/v1/metrics/bulk", { method: "POST", body: { jobs: ids.map((id) => ({ id })) } }),
    ]);
    const jobs = await Promise.all(ids.filter((id) => summaries.some((s) => s.id === id)).map((id) => api(`/v1/jobs/${id}`)));
    if (metrics.missing.length) showProblem(`Not found: ${metrics.missing.join(", ")}`);
    const name = (j) => `${j.name} ${j.id.slice(0, 6)}`;
    document.querySelector("#jobs tbody").replaceChildren(...jobs.map((j, i) => h("tr", {},
      h("td", {}, h("span", { style: `color:${COLORS[i]}` }, "■ "), h("a", { href: `/ui/jobs/${j.id}` }, name(j))),
      h("td", {}, status(j.status)), h("td", { class: "num" }, j.best ? fmt(j.best.value) : "–"),
      h("td", {}, `${j.progress.epoch}/${j.progress.epochs}`))));

    const flat = jobs.map((j) => flatten(j.spec));
    const paths = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
    const differing = paths.filter((p) => new Set(flat.map((f) => f[p])).size > 1);
    const diff = document.getElementById("diff");
    diff.tHead.replaceChildren(h("tr", {}, h("th", { scope: "col" }, "Field"), ...jobs.map((j) => h("th", { scope: "col" }, name(j)))));
    diff.tBodies[0].replaceChildren(...differing.map((p) => h("tr", {}, h("th", { scope: "row" }, p),
      ...flat.map((f) => h("td", {}, f[p] === undefined ? "–" : f[p])))));
    document.getElementById("same").hidden = differing.length > 0;

    const keys = new Set();
    for (const c of Object.values(metrics.jobs)) for (const e of c.epochs) for (const k of Object.keys(e)) keys.add(k);
    keys.delete("epoch"); keys.delete("seconds");
    const container = document.getElementById("charts");
    for (const k of [...keys].sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)))) {
      const el = chartBox(container, `chart-${k}`, `${k} by epoch, every job`);
      plot(el, jobs.map((j, i) => {
        const ep = metrics.jobs[j.id]?.epochs || [];
        return { x: ep.map((e) => e.epoch), y: ep.map((e) => num(e[k])), name: name(j), mode: "lines", line: { color: COLORS[i] } };
      }), { title: { text: k }, xaxis: { title: { text: "epoch" } }, yaxis: { type: k === "lr" ? "log" : "linear" } });
      el.dataset.traces = String(jobs.length);
    }
  }
  const reload = debounce(() => load().catch(showProblem), 500);
  events({ job: (c) => { if (ids.includes(c.job_id)) reload(); } });
  load().catch(showProblem);
})();
