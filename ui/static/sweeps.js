// Sweeps: the list, live.
"use strict";
(() => {
  const { api, h, fmt, age, labels, status, events, debounce } = TY;
  let cursor = null;
  async function load(append = false) {
    const data = await api("/v1/sweeps", { query: { limit: 50, cursor: append ? cursor : null } });
    const rows = data.sweeps.map((s) => h("tr", { "data-id": s.id },
      h("td", {}, h("a", { href: `/ui/sweeps/${s.id}` }, s.name), " ", h("span", { class: "hint" }, s.id.slice(0, 8))),
      h("td", {}, status(s.status)), h("td", {}, s.method), h("td", {}, `${s.objective.mode} ${s.objective.metric}`),
      h("td", {}, `${s.trials_created}/${s.max_trials}`), h("td", { class: "num" }, fmt(s.best_value)),
      h("td", {}, labels(s.labels)), h("td", { title: s.created_at }, age(s.created_at))));
    const tbody = document.querySelector("#sweeps tbody");
    append ? tbody.append(...rows) : tbody.replaceChildren(...rows);
    cursor = data.next_cursor;
    document.getElementById("next").disabled = !cursor;
    document.getElementById("empty").hidden = tbody.children.length > 0;
  }
  document.getElementById("next").onclick = () => load(true);
  const reload = debounce(() => load(), 500);
  events({ sweep: reload });
  load();
})();
