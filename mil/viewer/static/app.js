// mil view: slide list, OpenSeadragon deep zoom, heatmap overlay, patch marks and galleries.
// All data comes from the server's JSON routes; coordinates are level-0 pixels, and the slide is 1 unit wide in
// OpenSeadragon's viewport, so a level-0 (x, y) sits at (x / width, y / width).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { config: null, slides: [], sortKey: "slide_id", sortAsc: true, slide: null, detail: null,
                source: null, round: null, focus: null };
const views = {};  // "main" and "compare": {viewer, heat, marks, sourceKey}

function make(tag, attrs = {}, text = "") {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text) el.textContent = text;
  return el;
}

function fmt(value) { return value === null || value === undefined ? "" : Number(value).toFixed(3); }

// ---------- slide list ----------
function renderList() {
  const needle = $("filter").value.trim().toLowerCase();
  const rows = state.slides.filter((s) => !needle ||
    [s.slide_id, s.label, s.split, s.prediction].some((v) => String(v).toLowerCase().includes(needle)));
  const key = state.sortKey, sign = state.sortAsc ? 1 : -1;
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return 0;
    if (x === null || x === "") return 1;
    if (y === null || y === "") return -1;
    return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * sign;
  });
  const body = document.querySelector("#slide-table tbody");
  body.replaceChildren(...rows.map((s) => {
    const tr = make("tr", { "data-slide": s.slide_id });
    tr.append(make("td", {}, s.slide_id), make("td", {}, s.label), make("td", {}, s.split),
              make("td", {}, fmt(s.score)), make("td", { class: s.prediction }, s.prediction));
    if (s.slide_id === state.slide) tr.classList.add("active");
    tr.addEventListener("click", () => openSlide(s.slide_id));
    return tr;
  }));
  document.querySelectorAll("#slide-table th").forEach((th) => {
    th.classList.toggle("asc", th.dataset.key === key && state.sortAsc);
    th.classList.toggle("desc", th.dataset.key === key && !state.sortAsc);
  });
}

// ---------- viewers ----------
function makeViewer(id) {
  return OpenSeadragon({ id, prefixUrl: "/static/openseadragon/images/", drawer: "canvas",
                         imageSmoothingEnabled: false, showNavigator: id === "viewer-main",
                         autoHideControls: false, animationTime: 0.5, maxZoomPixelRatio: 4, visibilityRatio: 0.5 });
}

function heatmapUrl(sourceKey) {
  const scale = $("scale").value, threshold = $("threshold").value;
  return `/api/slides/${encodeURIComponent(state.slide)}/heatmap/${sourceKey}.png?scale=${scale}&threshold=${threshold}`;
}

function setHeatmap(view) {
  if (view.heat) { view.viewer.world.removeItem(view.heat); view.heat = null; }
  view.heatLoading = true;
  const url = heatmapUrl(view.sourceKey);
  view.viewer.addTiledImage({
    tileSource: { type: "image", url }, x: 0, y: 0, width: 1, opacity: overlayOpacity(),
    success: (event) => { view.heat = event.item; view.heatLoading = false; },
    error: () => { view.heatLoading = false; },
  });
}

function overlayOpacity() { return $("overlay-toggle").checked ? Number($("opacity").value) : 0; }

function rect(x, y, side, cls) {
  const r = document.createElementNS(SVG, "rect");
  r.setAttribute("x", x); r.setAttribute("y", y); r.setAttribute("width", side); r.setAttribute("height", side);
  r.setAttribute("class", cls);
  return r;
}

function drawMarks(view) {
  const d = state.detail;
  if (view.marks) view.viewer.removeOverlay(view.marks);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "marks");
  svg.setAttribute("viewBox", `0 0 ${d.width} ${d.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  if ($("outlines-toggle").checked) {
    for (const [group, rings] of Object.entries(d.annotations)) {
      const cls = ["tumor", "lookalike", "exclusion"].includes(group) ? `outline-${group}` : "outline-other";
      for (const ring of rings) {
        const p = document.createElementNS(SVG, "polygon");
        p.setAttribute("points", ring.map((xy) => xy.join(",")).join(" "));
        p.setAttribute("class", cls);
        svg.append(p);
      }
    }
  }
  const side = d.patch_size_level0;
  if ($("marks-toggle").checked) {
    for (const patch of d.top_k[view.sourceKey] || []) svg.append(rect(patch.x, patch.y, side, "topk"));
    const round = currentRound();
    if (round) {
      for (const kind of ["positive", "hard_negative"]) {
        for (const patch of round.mined[kind]) svg.append(rect(patch.x, patch.y, side, kind));
      }
    }
  }
  if (state.focus) svg.append(rect(state.focus.x, state.focus.y, side, "focus"));
  view.marks = svg;
  view.viewer.addOverlay({ element: svg, location: new OpenSeadragon.Rect(0, 0, 1, d.height / d.width) });
}

function refreshView(view) { setHeatmap(view); drawMarks(view); }

function openView(name, sourceKey, then = null) {
  const view = views[name];
  view.sourceKey = sourceKey;
  view.opened = false;
  view.viewer.addOnceHandler("open", () => { view.opened = true; refreshView(view); if (then) then(); });
  view.viewer.open(`/slides/${encodeURIComponent(state.slide)}.dzi`);
}

function titleOf(key) {
  const source = state.config.sources.find((s) => s.key === key);
  return source ? source.title : key;
}

// ---------- slide ----------
async function openSlide(slideId) {
  const response = await fetch(`/api/slides/${encodeURIComponent(slideId)}`);
  if (!response.ok) return;
  state.slide = slideId;
  state.detail = await response.json();
  state.focus = null;
  $("slide-title").textContent = slideId;
  const select = $("source");
  select.replaceChildren(...state.detail.sources.map((key) => make("option", { value: key }, titleOf(key))));
  const sources = state.detail.sources;  // keep the chosen source; else the run; else the latest round
  const keep = sources.includes(state.source) ? state.source : (sources.includes("run") ? "run" : sources[sources.length - 1]);
  select.value = state.source = keep;
  const roundSelect = $("round");
  const rounds = state.detail.rounds;
  $("rounds-panel").hidden = rounds.length === 0;
  $("compare-label").hidden = rounds.length < 2;
  roundSelect.replaceChildren(...rounds.map((r) => make("option", { value: r.round }, String(r.round))));
  if (rounds.length) roundSelect.value = String(rounds[rounds.length - 1].round);
  renderList();
  renderDownloads();
  renderGalleries();
  openView("main", state.source);
  updateCompare();
  $("title-main").textContent = titleOf(state.source);
}

function currentRound() {
  if (!state.detail || !state.detail.rounds.length) return null;
  return state.detail.rounds.find((r) => String(r.round) === $("round").value) || null;
}

function updateCompare() {
  const on = $("compare").checked && !$("compare-label").hidden;
  const round = currentRound();
  $("box-compare").hidden = !on;
  if (!on || !round) { $("title-main").textContent = titleOf(state.source); return; }
  const first = state.detail.rounds[0];
  if (!views.compare) {
    views.compare = { viewer: makeViewer("viewer-compare") };
    syncViews(views.main, views.compare);
    syncViews(views.compare, views.main);
  }
  // Side by side: round 0 on the left, the chosen round on the right, one navigation for both.
  views.main.sourceKey = first.has_scores ? first.source : state.source;
  $("title-main").textContent = titleOf(views.main.sourceKey);
  $("title-compare").textContent = titleOf(round.has_scores ? round.source : state.source);
  refreshView(views.main);
  // Both panes just changed size: start them together from the whole slide once the second one is open.
  openView("compare", round.has_scores ? round.source : state.source, () => setTimeout(() => {
    views.main.viewer.viewport.goHome(true);
    views.compare.viewer.viewport.fitBounds(views.main.viewer.viewport.getBounds(true), true);
  }, 100));
}

function syncViews(from, to) {
  let busy = false;
  from.viewer.addHandler("viewport-change", () => {
    if (busy || !to.viewer || $("box-compare").hidden || !to.opened) return;
    busy = true;
    to.viewer.viewport.fitBounds(from.viewer.viewport.getBounds(), true);
    busy = false;
  });
}

// ---------- galleries ----------
function figure(patch, caption) {
  const fig = make("figure", { "data-x": patch.x, "data-y": patch.y });
  fig.append(make("img", { src: `/api/slides/${encodeURIComponent(state.slide)}/patch/${patch.x}_${patch.y}.jpg`,
                           alt: `patch at ${patch.x}, ${patch.y}`, loading: "lazy" }),
             make("figcaption", {}, caption));
  fig.addEventListener("click", () => {
    document.querySelectorAll(".gallery figure.active").forEach((f) => f.classList.remove("active"));
    fig.classList.add("active");
    flyTo(patch);
  });
  return fig;
}

function renderGalleries() {
  const d = state.detail;
  const top = d.top_k[state.source] || [];
  $("topk-source").textContent = titleOf(state.source);
  $("gallery-topk").replaceChildren(...top.map((p, i) => figure(p, `#${i + 1} p=${fmt(p.probability)}`)));
  const round = currentRound();
  for (const kind of ["positive", "hard_negative"]) {
    const patches = round ? round.mined[kind] : [];
    $(`gallery-${kind}`).replaceChildren(...patches.map((p) =>
      figure(p, `${fmt(p.score)}${p.truth ? " " + p.truth : ""}`)));
  }
  const quality = round ? round.quality : {};
  const rows = Object.entries(quality).filter(([, v]) => v === null || typeof v !== "object")
    .concat(Object.entries(quality.hard_negative_composition || {}).map(([k, v]) => [`hard negatives: ${k}`, v]));
  const table = make("table");
  table.append(...rows.map(([k, v]) => {
    const tr = make("tr");
    tr.append(make("td", {}, k), make("td", {}, typeof v === "number" ? fmt(v) : String(v)));
    return tr;
  }));
  $("quality").replaceChildren(rows.length ? table : make("p", { class: "note" },
    "no selection_quality.json for this round (run the loop with annotations)"));
}

function renderDownloads() {
  const id = encodeURIComponent(state.slide), key = state.source;
  const heat = make("a", { href: `/download/${id}/${key}/heatmap.png`, download: "" }, "heatmap PNG");
  const qupath = make("a", { href: `/download/${id}/${key}/qupath.geojson?k=${state.config.top_k}`, download: "" },
                      `QuPath GeoJSON (top ${state.config.top_k})`);
  const tiles = make("a", { href: `/download/${id}/${key}/qupath_tiles.geojson`, download: "" },
                     "QuPath tiles (every patch, tumor score)");
  $("downloads").replaceChildren(make("h2", {}, "downloads"), heat, qupath, tiles);
}

function flyTo(patch) {
  const d = state.detail, s = d.patch_size_level0;
  state.focus = patch;
  const box = new OpenSeadragon.Rect((patch.x - 2 * s) / d.width, (patch.y - 2 * s) / d.width, 5 * s / d.width,
                                     5 * s / d.width);
  views.main.viewer.viewport.fitBounds(box);
  drawMarks(views.main);
  if (views.compare && !$("box-compare").hidden) drawMarks(views.compare);
}

// ---------- test and automation hooks ----------
window.milView = {
  state,
  openSlide,
  ready() {
    const list = Object.values(views).filter((v) => v === views.main || !$("box-compare").hidden);
    return Boolean(state.detail) && list.every((v) => v.opened && !v.heatLoading && v.viewer.world.getItemCount() > 0 &&
      [...Array(v.viewer.world.getItemCount()).keys()].every((i) => v.viewer.world.getItemAt(i).getFullyLoaded()));
  },
  center() {  // level-0 pixel at the centre of the main view, after animation
    const c = views.main.viewer.viewport.getCenter(true);
    return { x: c.x * state.detail.width, y: c.y * state.detail.width };
  },
};

// ---------- wiring ----------
async function start() {
  state.config = await (await fetch("/api/config")).json();
  state.slides = await (await fetch("/api/slides")).json();
  $("threshold-note").textContent = `prediction: tumor when score ≥ ${fmt(state.config.threshold)} ` +
    `(${state.config.threshold_source})`;
  views.main = { viewer: makeViewer("viewer-main") };
  $("filter").addEventListener("input", renderList);
  document.querySelectorAll("#slide-table th").forEach((th) => th.addEventListener("click", () => {
    state.sortAsc = state.sortKey === th.dataset.key ? !state.sortAsc : true;
    state.sortKey = th.dataset.key;
    renderList();
  }));
  $("source").addEventListener("change", () => {
    state.source = $("source").value;
    $("compare").checked = false;
    updateCompare();
    views.main.sourceKey = state.source;
    refreshView(views.main);
    renderGalleries();
    renderDownloads();
  });
  const eachView = (f) => Object.values(views).forEach((v) => v.opened && f(v));
  const opacity = () => eachView((v) => v.heat && v.heat.setOpacity(overlayOpacity()));
  $("overlay-toggle").addEventListener("change", opacity);
  $("opacity").addEventListener("input", opacity);
  $("scale").addEventListener("change", () => eachView(setHeatmap));
  $("threshold").addEventListener("change", () => eachView(setHeatmap));
  $("threshold").addEventListener("input", () => { $("threshold-value").textContent = fmt($("threshold").value); });
  for (const id of ["outlines-toggle", "marks-toggle"]) $(id).addEventListener("change", () => eachView(drawMarks));
  $("round").addEventListener("change", () => { renderGalleries(); updateCompare(); eachView(drawMarks); });
  $("compare").addEventListener("change", () => {
    updateCompare();
    if (!$("compare").checked) { views.main.sourceKey = state.source; refreshView(views.main); }
  });
  renderList();
  const first = new URLSearchParams(location.search).get("slide");
  if (first && state.slides.some((s) => s.slide_id === first)) openSlide(first);
}

document.addEventListener("DOMContentLoaded", start);
