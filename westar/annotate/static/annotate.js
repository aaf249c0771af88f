// westar annotate: the page. Talks to the JSON API of westar/annotate/server.py.
// Every action goes through one queue, so fast typing is applied in order, each key to
// the state left by the previous one. document.body.dataset.pending counts queued work.
"use strict";

const SLOTS = [["p", "anchor"], ["q", "anchor"], ["p", "q"]]; // (point a, point b) per slot
const NAMES = { anchor: "A", p: "P", q: "Q" };
const KEYS = { f: "farther", c: "closer", e: "equal" };
const SVGNS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = { summary: null, image: null, index: 0, cur: null, scale: [1, 1], drag: null };
window.annotateState = state;

let queue = Promise.resolve();
let pending = 0;
function enqueue(fn) {
  pending += 1;
  document.body.dataset.pending = String(pending);
  queue = queue.then(fn).catch(showError).finally(() => {
    pending -= 1;
    document.body.dataset.pending = String(pending);
  });
  return queue;
}

function showError(err) {
  const box = $("error");
  box.textContent = String(err && err.message ? err.message : err);
  box.hidden = false;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (err) {
    throw new Error("the westar annotate server does not answer (was it stopped?): " + err);
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || res.status + " " + res.statusText);
  $("error").hidden = true;
  return data;
}

// ------------------------------------------------------------------ navigation

function firstOpenSlot(image, from) {
  const order = [];
  image.samples.forEach((s, si) => s.answers.forEach((r, k) => order.push([si, k, r])));
  const start = from ? order.findIndex(([si, k]) => si === from[0] && k === from[1]) + 1 : 0;
  for (let d = 0; d < order.length; d++) {
    const [si, k, r] = order[(start + d) % order.length];
    if (r === null) return [si, k];
  }
  return null;
}

async function openImage(index, cur) {
  const image = await api("GET", "/api/image/" + index);
  state.index = index;
  state.image = image;
  state.cur = cur || firstOpenSlot(image) || (image.conflicts[0] || [0, 0]);
  history.replaceState(null, "", "#" + index);
  $("jump").value = String(index);
  const photo = $("photo");
  if (photo.dataset.index !== String(index)) {
    photo.dataset.index = String(index);
    await new Promise((resolve) => {
      photo.onload = resolve;
      photo.onerror = () => { showError("cannot show image " + image.name); resolve(); };
      photo.src = "/image/" + index;
    });
  }
  layout();
  render();
}

async function refreshSummary() {
  state.summary = await api("GET", "/api/summary");
  renderSummary();
}

function applyReply(reply, previousCur) {
  state.summary = reply.summary;
  renderSummary();
  if (!reply.image) return null;
  state.image = reply.image;
  const conflicts = reply.image.conflicts;
  if (conflicts.length) {  // stay on the pair just answered: one key changes it
    state.cur = previousCur;
    render();
    return null;
  }
  const next = firstOpenSlot(reply.image, previousCur);
  if (next) {
    state.cur = next;
    render();
    return null;
  }
  render();
  return reply.image.done && !reply.image.skipped ? nextUnfinished() : null;
}

function nextUnfinished() {  // first unfinished image after the current one (wrapping)
  const rows = state.summary.images, n = rows.length;
  for (let d = 1; d <= n; d++) {
    const r = rows[(state.index + d) % n];
    if (!r.done) return r.index;
  }
  return null;
}

// ------------------------------------------------------------------ actions

function answer(relation) {
  return enqueue(async () => {
    if (!state.image || !state.cur) return;
    const [sample, slot] = state.cur;
    const reply = await api("POST", "/api/answer", { image: state.index, sample, slot, relation });
    const next = applyReply(reply, [sample, slot]);
    if (next !== null && next !== undefined) await openImage(next);
  });
}

function undo() {
  return enqueue(async () => {
    const before = state.image;
    const reply = await api("POST", "/api/undo", {});
    state.summary = reply.summary;
    renderSummary();
    if (!reply.image) { showError("nothing to undo"); return; }
    let cur = null;
    if (before && reply.image.index === before.index) {
      reply.image.samples.forEach((s, si) => s.answers.forEach((r, k) => {
        const old = before.samples[si];
        const moved = old && ["anchor", "p", "q"].some((n) => old[n][0] !== s[n][0] || old[n][1] !== s[n][1]);
        if (!cur && (moved || !old || old.answers[k] !== r)) cur = [si, k];
      }));
    }
    await openImage(reply.image.index, cur);
  });
}

function skip() {
  return enqueue(async () => {
    const skipped = !state.image.skipped;
    const reply = await api("POST", "/api/skip", { image: state.index, skipped });
    applyReply(reply, state.cur);
    const next = skipped ? nextUnfinished() : null;
    if (next !== null) await openImage(next);
  });
}

function go(delta) {
  return enqueue(async () => {
    const n = state.summary.images.length;
    await openImage((state.index + delta + n) % n);
  });
}

function jump(index) {
  return enqueue(() => openImage(index));
}

function selectPair(sample, slot) {
  state.cur = [sample, slot];
  render();
}

function movePoint(sample, point, x, y) {
  return enqueue(async () => {
    const reply = await api("POST", "/api/move", { image: state.index, sample, point, x, y });
    state.summary = reply.summary;
    renderSummary();
    state.image = reply.image;
    state.cur = firstOpenSlot(reply.image, [sample, -1]) || state.cur;
    render();
  });
}

// ------------------------------------------------------------------ drawing

function layout() {
  const img = state.image;
  const maxW = Math.max(200, window.innerWidth - 480);
  const maxH = Math.max(200, window.innerHeight - 90);
  const k = Math.min(maxW / img.width, maxH / img.height);
  const w = Math.round(img.width * k), h = Math.round(img.height * k);
  const photo = $("photo"), svg = $("overlay");
  photo.style.width = w + "px";
  photo.style.height = h + "px";
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  state.scale = [w / img.width, h / img.height];
}

const toScreen = (pt) => [(pt[0] + 0.5) * state.scale[0], (pt[1] + 0.5) * state.scale[1]];

function el(name, attrs, parent) {
  const node = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function isConflict(si, k) {
  return state.image.conflicts.some(([a, b]) => a === si && b === k);
}

function render() {
  const img = state.image, svg = $("overlay");
  svg.replaceChildren();
  img.existing.forEach((p, i) => {
    const [ax, ay] = toScreen(p.a), [bx, by] = toScreen(p.b);
    const bad = img.existing_conflicts.includes(i);
    el("line", { x1: ax, y1: ay, x2: bx, y2: by, class: bad ? "link conflict" : "old" }, svg);
  });
  const [cs, ck] = state.cur || [0, 0];
  img.samples.forEach((s, si) => {
    SLOTS.forEach(([a, b], k) => {
      if (!isConflict(si, k)) return;
      const [ax, ay] = toScreen(s[a]), [bx, by] = toScreen(s[b]);
      el("line", { x1: ax, y1: ay, x2: bx, y2: by, class: "link conflict" }, svg);
    });
  });
  img.samples.forEach((s, si) => {
    if (si === cs) return;
    for (const name of ["anchor", "p", "q"]) {
      const [x, y] = toScreen(s[name]);
      const c = el("circle", { cx: x, cy: y, r: 4, class: "pt other", "data-sample": si, "data-point": name }, svg);
      c.addEventListener("pointerdown", (ev) => startDrag(ev, si, name));
    }
  });
  const s = img.samples[cs];
  if (s) {
    const [a, b] = SLOTS[ck];
    const [ax, ay] = toScreen(s[a]), [bx, by] = toScreen(s[b]);
    el("line", { x1: ax, y1: ay, x2: bx, y2: by, class: "link" }, svg);
    for (const name of ["anchor", "p", "q"]) {
      const [x, y] = toScreen(s[name]);
      const role = name === a ? "a" : name === b ? "b" : "c";
      const c = el("circle", { cx: x, cy: y, r: role === "c" ? 5 : 8, class: "pt active " + role,
        id: "pt-" + name, "data-sample": cs, "data-point": name }, svg);
      c.addEventListener("pointerdown", (ev) => startDrag(ev, cs, name));
      const label = el("text", { x: x + 10, y: y - 8 }, svg);
      label.textContent = role === "a" ? "1" : role === "b" ? "2" : NAMES[name];
    }
  }
  renderPanel();
}

function relText(r) {
  return r === null ? "…" : r;
}

function renderPanel() {
  const img = state.image;
  const [cs, ck] = state.cur || [0, 0];
  $("name").textContent = `${img.name} (${img.width}×${img.height})` + (img.skipped ? " — skipped" : "");
  const [a, b] = SLOTS[ck];
  $("question").innerHTML = `Sample ${cs + 1}, pair ${ck + 1}/3: is <b class="la">1</b> (${NAMES[a]}) ` +
    `farther, closer or equal to <b class="lb">2</b> (${NAMES[b]})?`;
  const list = $("pairs");
  list.replaceChildren();
  img.samples.forEach((s, si) => SLOTS.forEach(([pa, pb], k) => {
    const li = document.createElement("li");
    li.textContent = `${NAMES[pa]}${si + 1} vs ${NAMES[pb]}${si + 1}: ${relText(s.answers[k])}`;
    li.dataset.sample = si;
    li.dataset.slot = k;
    if (si === cs && k === ck) li.classList.add("current");
    if (isConflict(si, k)) li.classList.add("conflict");
    li.addEventListener("click", () => selectPair(si, k));
    list.appendChild(li);
  }));
  img.existing.forEach((p, i) => {
    const li = document.createElement("li");
    li.className = "existing" + (img.existing_conflicts.includes(i) ? " conflict" : "");
    li.textContent = `[${p.a}] vs [${p.b}]: ${p.relation} (already in the file)`;
    list.appendChild(li);
  });
  const box = $("conflict");
  if (img.conflicts.length || img.existing_conflicts.length) {
    const names = img.conflicts.map(([si, k]) =>
      `${NAMES[SLOTS[k][0]]}${si + 1} ${img.samples[si].answers[k]} than ${NAMES[SLOTS[k][1]]}${si + 1}`);
    if (img.existing_conflicts.length) names.push(img.existing_conflicts.length + " pair(s) already in the file");
    box.textContent = "Contradiction: these answers cannot all be true:\n" + names.join("; ") +
      "\nPress F, C or E to change the highlighted answer, or click another red pair to change it.";
    box.hidden = false;
  } else {
    box.hidden = true;
  }
  const allDone = state.summary && state.summary.next === null;
  $("done-msg").hidden = !(img.done && !img.conflicts.length);
  $("done-msg").textContent = allDone ? "All images are done. Answers are saved; you can close this tab."
    : img.skipped ? "This image is skipped (S to take it back)." : "This image is done.";
  $("btn-skip").innerHTML = img.skipped ? "<kbd>S</kbd> unskip" : "<kbd>S</kbd> skip image";
}

function renderSummary() {
  const s = state.summary;
  const n = s.images.length;
  $("images-bar").max = n;
  $("images-bar").value = s.images_done;
  $("images-text").textContent = `${s.images_done}/${n}`;
  $("pairs-bar").max = Math.max(1, s.pairs_total);
  $("pairs-bar").value = s.pairs_done;
  $("pairs-text").textContent = `${s.pairs_done}/${s.pairs_total}`;
  const file = s.out.split(/[\\/]/).pop();
  $("saved").textContent = s.saves ? `saved to ${file} (${s.saves} writes)` : `file: ${file}`;
  $("saved").title = s.out;
  $("saved").dataset.saves = s.saves;
  const jumpBox = $("jump");
  jumpBox.replaceChildren();
  s.images.forEach((r) => {
    const o = document.createElement("option");
    o.value = r.index;
    const mark = r.conflicts ? " ⚠" : r.skipped ? " (skipped)" : r.done ? " ✓" : "";
    o.textContent = `${r.index + 1}. ${r.stem} ${r.answered}/${r.slots}${mark}`;
    jumpBox.appendChild(o);
  });
  jumpBox.value = String(state.index);
  const notes = $("notes");
  notes.hidden = !s.notes.length;
  notes.textContent = s.notes.map((t) => "Note: " + t).join("\n");
}

// ------------------------------------------------------------------ dragging

function startDrag(ev, sample, point) {
  ev.preventDefault();
  const circle = ev.target;
  circle.setPointerCapture(ev.pointerId);
  state.drag = { sample, point, circle, moved: false };
  const rect = $("overlay").getBoundingClientRect();
  const onMove = (e) => {
    state.drag.moved = true;
    circle.setAttribute("cx", e.clientX - rect.left);
    circle.setAttribute("cy", e.clientY - rect.top);
  };
  const onUp = (e) => {
    circle.removeEventListener("pointermove", onMove);
    circle.removeEventListener("pointerup", onUp);
    const drag = state.drag;
    state.drag = null;
    if (!drag.moved) {  // a click on a point selects its sample
      state.cur = [sample, firstSlotWith(point)];
      render();
      return;
    }
    const x = Math.min(state.image.width - 1, Math.max(0, Math.floor((e.clientX - rect.left) / state.scale[0])));
    const y = Math.min(state.image.height - 1, Math.max(0, Math.floor((e.clientY - rect.top) / state.scale[1])));
    movePoint(sample, point, x, y);
  };
  circle.addEventListener("pointermove", onMove);
  circle.addEventListener("pointerup", onUp);
}

function firstSlotWith(point) {
  return SLOTS.findIndex(([a, b]) => a === point || b === point);
}

// ------------------------------------------------------------------ wiring

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.target.tagName === "SELECT") return;
  const key = ev.key.toLowerCase();
  if (KEYS[key]) answer(KEYS[key]);
  else if (key === "z" || key === "u" || key === "backspace") undo();
  else if (key === "s") skip();
  else if (key === "arrowright" || key === "n") go(1);
  else if (key === "arrowleft" || key === "p") go(-1);
  else if (key === "g") { $("jump").focus(); }
  else return;
  ev.preventDefault();
});
for (const rel of ["farther", "closer", "equal"]) $("btn-" + rel).addEventListener("click", () => answer(rel));
$("btn-undo").addEventListener("click", () => undo());
$("btn-skip").addEventListener("click", () => skip());
$("btn-prev").addEventListener("click", () => go(-1));
$("btn-next").addEventListener("click", () => go(1));
$("jump").addEventListener("change", (ev) => { jump(Number(ev.target.value)); ev.target.blur(); });
window.addEventListener("resize", () => { if (state.image) { layout(); render(); } });

enqueue(async () => {
  await refreshSummary();
  const fromHash = Number(location.hash.slice(1));
  const n = state.summary.images.length;
  const start = location.hash && Number.isInteger(fromHash) && fromHash >= 0 && fromHash < n
    ? fromHash : (state.summary.next ?? 0);
  await openImage(start);
});
