// The slide page: the slide (Deep Zoom) with the heat map as a second layer placed in the same image frame
// (full-resolution pixels from the slide's bounds offset, as tiles.csv and the GeoJSON), hover read-out,
// class toggles, opacity, scale bar, and lists that pan to regions and top tiles.
"use strict";
(async function () {
  const data = await (await fetch("data.json")).json();
  const W = data.size[0], g = data.grid;
  const hidden = new Set();
  let layer = "carcinoma", heatItem = null;
  const byCell = new Map(data.tiles.map((t) => [t.row + "," + t.col, t]));
  document.getElementById("name").textContent = data.name;
  document.title = "histoboost view: " + data.name;

  const viewer = OpenSeadragon({
    element: document.getElementById("slide-viewer"), tileSources: data.dzi, drawer: "canvas",
    showNavigationControl: false, keyboardNavEnabled: true, gestureSettingsMouse: {clickToZoom: false},
    animationTime: 0.3, visibilityRatio: 0.5,
  });
  window.viewer = viewer;

  function slideItem() { return viewer.world.getItemAt(0); }
  function heatUrl() { return "heat.png?layer=" + layer + "&hide=" + [...hidden].sort().join(","); }

  function addHeat() {
    const toPx = g.cell_px / g.stride;  // heat-image pixels per full-resolution pixel
    const clip = new OpenSeadragon.Rect(Math.max(0, -g.origin[0]) * toPx, Math.max(0, -g.origin[1]) * toPx,
      (data.size[0] - g.origin[0]) * toPx, (data.size[1] - g.origin[1]) * toPx);
    window.heatReady = false;
    viewer.addTiledImage({
      tileSource: {type: "image", url: heatUrl()}, x: g.origin[0] / W, y: g.origin[1] / W,
      width: g.cols * g.stride / W, opacity: Number(document.getElementById("opacity").value), clip: clip,
      index: 1, replace: heatItem !== null,
      success: (event) => {
        heatItem = event.item;
        window.heatItem = heatItem;
        heatItem.setOpacity(Number(document.getElementById("opacity").value));  // moved while it loaded
        const done = () => { window.heatReady = true; };
        if (heatItem.getFullyLoaded()) done(); else heatItem.addOnceHandler("fully-loaded-change", done);
      },
    });
  }

  // OpenSeadragon's keyboard navigation listens on its canvas: label it and give it the focus.
  viewer.canvas.setAttribute("aria-label", "slide: arrow keys or W A S D pan, + and - zoom, 0 goes home");
  viewer.addOnceHandler("open", () => { addHeat(); updateScale(); viewer.canvas.focus(); });
  viewer.addHandler("animation", updateScale);
  viewer.addHandler("resize", updateScale);

  document.getElementById("opacity").addEventListener("input", (e) => {
    if (heatItem) heatItem.setOpacity(Number(e.target.value));
  });
  document.querySelectorAll('input[name="layer"]').forEach((input) => input.addEventListener("change", (e) => {
    layer = e.target.value; addHeat(); drawLegend();
  }));

  // Class toggles and legend.
  const classes = document.getElementById("classes");
  data.classes.forEach((name, k) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.dataset.class = String(k);
    box.addEventListener("change", () => { if (box.checked) hidden.delete(k); else hidden.add(k); addHeat(); });
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = "rgb(" + data.colors[k].join(",") + ")";
    label.append(box, swatch, " " + name);
    classes.append(label);
  });
  function drawLegend() {
    const legend = document.getElementById("legend");
    legend.className = layer === "carcinoma" ? "cividis" : "";
    legend.textContent = layer === "carcinoma" ? "0 \u2014 p(in situ) + p(invasive) \u2014 1" : "colours: the classes below";
  }
  drawLegend();

  // The tile under the pointer: its cell in the grid, looked up in the scored tiles.
  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: (event) => {
      if (!slideItem()) return;
      const point = slideItem().viewerElementToImageCoordinates(event.position);
      const col = Math.floor((point.x - g.origin[0]) / g.stride), row = Math.floor((point.y - g.origin[1]) / g.stride);
      const tile = byCell.get(row + "," + col);
      const info = document.getElementById("tileinfo");
      if (!tile) { info.textContent = "no scored tile here"; info.dataset.tile = ""; return; }
      info.dataset.tile = tile.x + "," + tile.y;
      info.innerHTML = "";
      const head = document.createElement("div");
      head.className = "tileclass";
      head.textContent = tile.class + (tile.confirmed ? " (confirmed)" : "") + " at x=" + tile.x + ", y=" + tile.y;
      info.append(head);
      const table = document.createElement("table");
      for (const [name, p] of Object.entries(tile.p).concat([["carcinoma", tile.p_carcinoma]])) {
        const tr = table.insertRow();
        tr.insertCell().textContent = "p_" + name;
        const cell = tr.insertCell(); cell.textContent = p.toFixed(3); cell.dataset.p = "p_" + name;
      }
      info.append(table);
      if (tile.refer) { const r = document.createElement("div"); r.className = "refer"; r.textContent = "refer: " + tile.refer; info.append(r); }
    },
  });

  // Scale bar: a round length in µm about 120 screen pixels long.
  function updateScale() {
    const item = slideItem();
    if (!item) return;
    const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
    const umPerScreenPx = data.mpp * 1000 / (b.x - a.x);
    const target = 120 * umPerScreenPx;
    const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000];
    const length = steps.filter((s) => s <= target).pop() || steps[0];
    document.getElementById("scalebar-bar").style.width = (length / umPerScreenPx) + "px";
    document.getElementById("scalebar-label").textContent = length >= 1000 ? (length / 1000) + " mm" : length + " \u00b5m";
  }

  // Summary, regions, top tiles.
  const s = data.summary, summary = document.getElementById("summary");
  const lines = [["call", s.call], ["refer", s.refer.join("; ") || "no"], ["tissue", s.tissue_mm2.toFixed(2) + " mm\u00b2"]]
    .concat(Object.entries(s.area_mm2).map(([c, a]) => ["area " + c, a.toFixed(2) + " mm\u00b2"]))
    .concat([["carcinoma regions", s.regions + " (largest " + s.largest_mm2.toFixed(2) + " mm\u00b2)"],
             ["tiles", s.tiles.scored + " scored, " + s.tiles.confirmed + " confirmed"], ["stain", s.stain],
             ["bundle", s.bundle.slice(0, 12)]]);
  for (const [k, v] of lines) { const tr = summary.insertRow(); tr.insertCell().textContent = k; tr.insertCell().textContent = v; }

  function panTo(x0, y0, w, h) {
    viewer.viewport.fitBounds(slideItem().imageToViewportRectangle(x0, y0, w, h));
  }
  function list(id, items, text, box) {
    const ol = document.getElementById(id);
    if (!items.length) { ol.innerHTML = "<li>none</li>"; return; }
    items.forEach((item, i) => {
      const li = document.createElement("li"), button = document.createElement("button");
      button.textContent = text(item, i); button.dataset.index = String(i);
      button.addEventListener("click", () => panTo(...box(item)));
      li.append(button); ol.append(li);
    });
  }
  list("regions", data.regions, (r) => r.class + ", " + r.area_mm2.toFixed(2) + " mm\u00b2",
       (r) => [r.bounds[0], r.bounds[1], r.bounds[2] - r.bounds[0], r.bounds[3] - r.bounds[1]]);
  list("top", data.top, (t) => t.class + ", p(carcinoma) " + t.p_carcinoma.toFixed(3), (t) => [t.x, t.y, t.width, t.height]);
})();
