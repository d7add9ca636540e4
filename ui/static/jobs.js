// Jobs: a live list (filters, sort, cursor paging, select to compare, cancel).
"use strict";
(() => {
  const { api, h, fmt, age, short, labels, status, events, debounce } = TY;
  const form = document.getElementById("filters");
  const tbody = document.querySelector("#jobs tbody");
  const selected = new Set();
  let cursors = [null];  // the cursor of each page seen (the first page has none)
  let page = 0;
  let shown = new Map();  // job id -> row

  // filters live in the URL, so a view can be bookmarked and shared
  const params = new URLSearchParams(location.search);
  for (const el of form.elements) if (el.name && params.get(el.name)) el.value = params.get(el.name);

  function query() {
    const q = { limit: 25 };
    for (const el of form.elements) {
      if (!el.name || !el.value) continue;
      q[el.name] = el.name === "created_after" ? new Date(el.value).toISOString() : el.value;
    }
    return q;
  }

  function row(j) {
    const pct = j.progress.epochs ? Math.min(100, 100 * j.progress.epoch / j.progress.epochs) : 0;
    const box = h("input", { type: "checkbox", "aria-label": `select ${j.name} ${short(j.id)}`, checked: selected.has(j.id),
      onchange: (e) => { e.target.checked ? selected.add(j.id) : selected.delete(j.id); updateSelection(); } });
    const cancel = ["queued", "running", "paused"].includes(j.status) && !j.cancel_requested
      ? h("button", { type: "button", class: "cancel", onclick: () => cancelJob(j) }, "Cancel") : null;
    return h("tr", { "data-id": j.id },
      h("td", {}, box),
      h("td", {}, h("a", { href: `/ui/jobs/${j.id}` }, j.name), " ", h("span", { class: "hint" }, short(j.id))),
      h("td", {}, status(j.status)),
      h("td", {}, h("span", { class: "bar", "aria-hidden": "true" }, h("span", { style: `width:${pct}%` })),
        `${j.progress.epoch}/${j.progress.epochs}`),
      h("td", { class: "num" }, j.best ? `${fmt(j.best.value)}` : "–", j.best?.monitor ? h("span", { class: "hint" }, ` ${j.best.monitor}`) : null),
      h("td", {}, j.stop_reason || (j.error ? "error" : "–")),
      h("td", {}, labels(j.labels)),
      h("td", { title: j.created_at }, age(j.created_at)),
      h("td", {}, j.sweep_id ? h("a", { href: `/ui/sweeps/${j.sweep_id}` }, `#${j.trial_number}`) : "–"),
      h("td", {}, cancel));
  }

  async function cancelJob(j) {
    if (!confirm(`Cancel ${j.name}?`)) return;
    try { replace(await api(`/v1/jobs/${j.id}/cancel`, { method: "POST" })); } catch (e) { alert(e.message); }
  }

  function replace(j, fresh = false) {
    const old = shown.get(j.id); if (!old) return;
    const r = row(j); if (fresh) r.classList.add("fresh");
    old.replaceWith(r); shown.set(j.id, r);
  }

  function updateSelection() {
    const btn = document.getElementById("compare");
    btn.disabled = selected.size < 2 || selected.size > 10;
    document.getElementById("selection").textContent =
      selected.size ? `${selected.size} selected (2–10 to compare).` : "Select 2–10 jobs to compare.";
  }
  document.getElementById("compare").onclick = () => { location.href = `/ui/compare?ids=${[...selected].join(",")}`; };

  async function load() {
    const q = query(); if (cursors[page]) q.cursor = cursors[page];
    let data;
    try { data = await api("/v1/jobs", { query: q }); } catch (e) { alert(e.message); return; }
    const before = new Set(shown.keys());
    tbody.replaceChildren(); shown = new Map();
    for (const j of data.jobs) {
      const r = row(j); if (before.size && !before.has(j.id)) r.classList.add("fresh");
      tbody.append(r); shown.set(j.id, r);
    }
    cursors[page + 1] = data.next_cursor;
    document.getElementById("next").disabled = !data.next_cursor;
    document.getElementById("first").disabled = page === 0;
    document.getElementById("empty").hidden = data.jobs.length > 0;
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault(); cursors = [null]; page = 0;
    const q = query(); delete q.limit;
    history.replaceState(null, "", "?" + new URLSearchParams(q).toString());
    load();
  });
  for (const el of form.querySelectorAll("select")) el.addEventListener("change", () => form.requestSubmit());
  document.getElementById("next").onclick = () => { if (cursors[page + 1]) { page += 1; load(); } };
  document.getElementById("first").onclick = () => { page = 0; load(); };

  // Live: changed rows are re-read in one request; new jobs reload the first page.
  const pending = new Set();
  const refreshRows = debounce(async () => {
    const ids = [...pending].filter((id) => shown.has(id)); pending.clear();
    if (!ids.length) return;
    const data = await api("/v1/jobs", { query: { id: ids, limit: ids.length } });
    for (const j of data.jobs) replace(j, true);
  }, 250);
  const reloadFirst = debounce(() => { if (page === 0) load(); }, 300);
  events({
    job: (c) => {
      if (c.kind === "state" && c.data.status === "queued" && !c.data.reason && !shown.has(c.job_id)) reloadFirst();
      else if (shown.has(c.job_id)) { pending.add(c.job_id); refreshRows(); }
      else if (page === 0 && query().order_by && query().order_by !== "created") reloadFirst();
    },
  });
  load(); updateSelection();
})();
