// New job: a form built from /v1/catalog beside the JSON it edits, validated live by the API's
// dry run (422 paths shown at the field, or under the editor), with the schedule preview plotted.
"use strict";
(() => {
  const { api, h, fmt, plot, debounce, COLORS } = TY;
  const editor = document.getElementById("editor");
  const fieldset = document.getElementById("fields");
  const errorsList = document.getElementById("errors");
  const STARTER = {
    name: "digits-mlp",
    data: { dataset: "digits", validation_split: 0.2, batch_size: 64, standardize: true },
    model: { layers: [{ type: "dense", units: 64, activation: "relu" }, { type: "dense", units: 10 }] },
    loss: "sparse_categorical_crossentropy", metrics: ["accuracy"],
    optimizer: { name: "adam", learning_rate: 0.001 }, epochs: 20,
    callbacks: { early_stopping: { monitor: "val_loss", patience: 5, restore_best_weights: true } },
  };

  const get = (obj, path) => path.reduce((o, k) => (o == null ? undefined : o[k]), obj);
  function set(obj, path, value) {
    let o = obj; for (const k of path.slice(0, -1)) { if (typeof o[k] !== "object" || o[k] === null) o[k] = {}; o = o[k]; }
    if (value === undefined) delete o[path[path.length - 1]]; else o[path[path.length - 1]] = value;
  }
  const pathText = (p) => p.join(".");

  // the form's fields: [JSON path, label, kind, options]
  function fieldsFrom(cat) {
    return [
      [["name"], "Name", "text"],
      [["data", "dataset"], "Dataset", "select", cat.datasets.map((d) => d.name || d.id)],
      [["data", "validation_split"], "Validation split", "number", { step: 0.05, min: 0, max: 0.95 }],
      [["data", "batch_size"], "Batch size", "number", { step: 1, min: 1 }],
      [["epochs"], "Epochs", "number", { step: 1, min: 1 }],
      [["loss"], "Loss", "select", cat.losses.map((l) => l.name)],
      [["optimizer", "name"], "Optimizer", "select", cat.optimizers.map((o) => o.name)],
      [["optimizer", "learning_rate"], "Learning rate (a number; a schedule object in the JSON)", "number", { step: "any", min: 0 }],
      [["labels", "team"], "Label: team", "text"],
      [["notes"], "Notes", "text"],
    ];
  }

  const inputs = new Map();  // path text -> [input, error element]
  function buildForm(fields) {
    for (const [path, label, kind, opts] of fields) {
      const id = `f-${pathText(path).replace(/\W/g, "-")}`;
      let input;
      if (kind === "select") input = h("select", { id, "data-path": pathText(path) }, ...opts.map((o) => h("option", { value: o }, o)));
      else input = h("input", { id, type: kind, "data-path": pathText(path), ...(opts || {}) });
      const err = h("span", { class: "field-error", id: `${id}-err`, role: "alert" });
      input.setAttribute("aria-describedby", `${id}-err`);
      input.addEventListener("input", () => {
        const spec = parse(); if (!spec) return;
        let v = input.value;
        if (kind === "number") v = v === "" ? undefined : Number(v);
        if (v === "" && (path[0] === "labels" || path[0] === "notes")) v = undefined;
        set(spec, path, v);
        if (path[0] === "labels" && spec.labels && !Object.keys(spec.labels).length) delete spec.labels;
        editor.value = JSON.stringify(spec, null, 2);
        document.getElementById("implied").dataset.state = "pending"; validateSoon();
      });
      fieldset.append(h("label", { for: id }, label, input, err));
      inputs.set(pathText(path), [input, err, path]);
    }
  }

  function syncForm(spec) {
    for (const [, [input, , path]] of inputs) {
      const v = get(spec, path);
      if (document.activeElement === input) continue;
      input.value = v === undefined || typeof v === "object" ? "" : v;
      input.disabled = typeof v === "object" && v !== null;  // e.g. a schedule object: edit it in the JSON
    }
  }

  function parse() {
    try { return JSON.parse(editor.value); } catch (e) { return null; }
  }

  function showErrors(detail) {
    for (const [, [input, err]] of inputs) { err.textContent = ""; input.removeAttribute("aria-invalid"); }
    errorsList.replaceChildren();
    for (const d of detail) {
      const match = [...inputs.keys()].filter((k) => d.path === k || d.path.startsWith(k + ".") || d.path.startsWith(k + "["))
        .sort((a, b) => b.length - a.length)[0];
      if (match) {
        const [input, err] = inputs.get(match); input.setAttribute("aria-invalid", "true");
        err.textContent = `${d.path}: ${d.msg}`;
      }
      errorsList.append(h("li", {}, h("code", {}, d.path || "(spec)"), " ", d.msg));
    }
  }

  let lastValid = null;
  async function validate() {
    const spec = parse();
    const implied = document.getElementById("implied");
    if (!spec) { showErrors([{ path: "", msg: "the JSON does not parse" }]); implied.textContent = ""; implied.dataset.state = "invalid"; lastValid = null; return; }
    syncForm(spec);
    try {
      const dry = await api("/v1/jobs/validate", { method: "POST", body: spec });
      showErrors([]); lastValid = dry; implied.dataset.state = "valid";
      implied.textContent = `Valid. ${dry.parameters != null ? dry.parameters.toLocaleString() + " parameters" : ""}` +
        `${dry.steps_per_epoch != null ? `, ${dry.steps_per_epoch} steps per epoch` : ""}; queue ${dry.queue}.`;
      preview(dry);
    } catch (e) {
      lastValid = null; implied.textContent = "Not valid yet."; implied.dataset.state = "invalid";
      if (e.status === 422 && Array.isArray(e.body?.errors)) showErrors(e.body.errors); else showErrors([{ path: "", msg: e.message }]);
    }
  }
  const validateSoon = debounce(validate, 300);

  async function preview(dry) {
    const steps = (dry.steps_per_epoch || 1) * dry.spec.epochs;
    try {
      const { lr } = await api("/v1/schedules/preview", { method: "POST", body: {
        learning_rate: dry.spec.optimizer.learning_rate, steps: Math.min(steps, 200000), steps_per_epoch: dry.steps_per_epoch || 1 } });
      const x = lr.map((_, i) => i / (dry.steps_per_epoch || 1));
      plot(document.getElementById("schedule"), [{ x, y: lr, mode: "lines", name: "learning rate", line: { color: COLORS[0] } }],
           { xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "learning rate" }, type: "log" } });
    } catch (e) { /* a rate the preview cannot draw (e.g. "find"): the spec's own errors say why */ }
  }

  editor.addEventListener("input", () => { document.getElementById("implied").dataset.state = "pending"; validateSoon(); });
  document.getElementById("form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const spec = parse(); if (!spec) return;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: spec });
      location.href = `/ui/jobs/${job.id}`;
    } catch (err) {
      if (err.status === 422 && Array.isArray(err.body?.errors)) showErrors(err.body.errors); else alert(err.message);
    }
  });

  (async () => {
    const cat = await api("/v1/catalog");
    buildForm(fieldsFrom(cat));
    editor.value = JSON.stringify(STARTER, null, 2);
    validate();
  })();
})();
