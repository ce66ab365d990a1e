// The image page: a gallery of predict's records (class, probabilities, agreement, refer, overlay), filtered
// by class and by referral.
"use strict";
(async function () {
  const data = await (await fetch("data.json")).json();
  document.getElementById("name").textContent = data.name;
  const select = document.getElementById("class-filter"), refer = document.getElementById("refer-filter");
  for (const name of [...new Set(data.records.map((r) => r.class))].sort()) {
    const option = document.createElement("option"); option.value = option.textContent = name; select.append(option);
  }
  const gallery = document.getElementById("gallery");
  const cards = data.records.map((record) => {
    const card = document.createElement("figure");
    card.className = "card"; card.dataset.class = record.class; card.dataset.refer = record.refer ? "1" : "";
    if (record.overlay) {
      const img = document.createElement("img"); img.src = record.overlay; img.alt = record.name; img.loading = "lazy";
      card.append(img);
    }
    const caption = document.createElement("figcaption");
    const title = document.createElement("strong"); title.textContent = record.name;
    const cls = document.createElement("div"); cls.className = "tileclass"; cls.textContent = record.class;
    caption.append(title, cls);
    const table = document.createElement("table");
    for (const [name, p] of Object.entries(record.p)) {
      const tr = table.insertRow(); tr.insertCell().textContent = "p_" + name;
      tr.insertCell().textContent = p === null ? "" : p.toFixed(3);
    }
    if (record.agreement !== null) { const tr = table.insertRow(); tr.insertCell().textContent = "agreement"; tr.insertCell().textContent = record.agreement.toFixed(2); }
    caption.append(table);
    if (record.refer) { const r = document.createElement("div"); r.className = "refer"; r.textContent = "refer: " + record.refer; caption.append(r); }
    card.append(caption);
    gallery.append(card);
    return card;
  });
  function apply() {
    let shown = 0;
    for (const card of cards) {
      const visible = (!select.value || card.dataset.class === select.value) && (!refer.checked || card.dataset.refer === "1");
      card.hidden = !visible; shown += visible;
    }
    document.getElementById("count").textContent = shown + " of " + cards.length + " images";
  }
  select.addEventListener("change", apply); refer.addEventListener("change", apply);
  apply();
})();
