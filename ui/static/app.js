// Trainyard dashboard: what every page shares. No framework; plotly.js for charts.
"use strict";
const TY = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  class ApiError extends Error {
    constructor(status, body) {
      super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
      this.status = status; this.body = body;
    }
  }

  async function api(path, { method = "GET", body, query } = {}) {
    let url = path;
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) {
        if (v === undefined || v === null || v === "") continue;
        for (const one of Array.isArray(v) ? v : [v]) q.append(k, one);
      }
      const s = q.toString(); if (s) url += "?" + s;
    }
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
    const r = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                 credentials: "same-origin" });
    if (r.status === 401) { location.href = "/ui/signin?next=" + encodeURIComponent(location.pathname + location.search); }
    const data = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  function h(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  const num = (v) => typeof v === "number" ? v : (v === "NaN" ? NaN : v === "Infinity" ? Infinity : v === "-Infinity" ? -Infinity : null);
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "string") return v;
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4);
  }
  function age(iso) {
    if (!iso) return "–";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${Math.round(s)} s`; if (s < 3600) return `${Math.round(s / 60)} min`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h`; return `${(s / 86400).toFixed(1)} d`;
  }
  const short = (id) => id ? id.slice(0, 8) : "";
  function labels(obj) { return Object.entries(obj || {}).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`)); }
  function status(s) { return h("span", { class: `status ${s}` }, s); }

  // The project's event stream (cookie-authenticated; EventSource reconnects with Last-Event-ID).
  function events(handlers, path = "/v1/events") {
    const live = document.getElementById("live");
    live.hidden = false;
    const src = new EventSource(path);
    src.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
    src.onerror = () => { live.textContent = "reconnecting"; live.classList.remove("on"); };
    for (const [kind, fn] of Object.entries(handlers)) src.addEventListener(kind, (e) => fn(JSON.parse(e.data), e));
    return src;
  }

  function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }

  const COLORS = ["#1f4e8c", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d", "#4d7c0f", "#334155"];
  const BASE_LAYOUT = { margin: { l: 56, r: 16, t: 56, b: 44 }, title: { x: 0.02, xanchor: "left" }, font: { family: "system-ui, sans-serif", size: 12, color: "#17202b" },
                        paper_bgcolor: "#fff", plot_bgcolor: "#fff",
                        legend: { orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom" } };
  function plot(el, traces, layout = {}) {
    return Plotly.react(el, traces, { ...BASE_LAYOUT, ...layout, title: { ...BASE_LAYOUT.title, ...(layout.title || {}) },
      xaxis: { gridcolor: "#e5e8ee", ...(layout.xaxis || {}) }, yaxis: { gridcolor: "#e5e8ee", ...(layout.yaxis || {}) } },
      { responsive: true, displaylogo: false });
  }
  function chartBox(container, id, title) {
    let el = document.getElementById(id);
    if (!el) { el = h("div", { id, class: "chart", role: "img", "aria-label": title }); container.append(el); }
    return el;
  }
  function showProblem(err) {
    const p = document.getElementById("problem"); if (!p) return;
    p.hidden = false; p.textContent = err instanceof Error ? err.message : String(err);
  }

  return { api, h, num, fmt, age, short, labels, status, events, debounce, plot, chartBox, COLORS, ApiError, showProblem };
})();
