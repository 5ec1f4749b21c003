/* driftbench leaderboard: sortable tables and filters (index page), per-case drill-down (cell pages).
   Vanilla JS, no network requests: data come from the page itself (<script type="application/json">), and every
   text taken from data is inserted with textContent, never parsed as HTML. */
(function () {
  "use strict";

  // ------------------------------------------------------------------------------------------ sorting
  function cellValue(row, col, type) {
    var cell = row.children[col];
    if (!cell) return null;
    var v = cell.getAttribute("data-v");
    if (v === null) v = cell.textContent.trim();
    if (type === "num") {
      if (v === "") return null;
      var x = parseFloat(v);
      return isNaN(x) ? null : x;
    }
    return v.toLowerCase();
  }

  function compare(va, vb, dir) {
    if (va === null && vb === null) return 0;
    if (va === null) return 1;            // missing values always last
    if (vb === null) return -1;
    var c = va < vb ? -1 : va > vb ? 1 : 0;
    return dir === "ascending" ? c : -c;
  }

  function nextDir(current, type) {
    if (current === "descending") return "ascending";
    if (current === "ascending") return "descending";
    return type === "num" ? "descending" : "ascending";   // numbers: best first
  }

  function sortTable(table, col, type, dir) {
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.forEach(function (r, i) { if (!r.hasAttribute("data-i")) r.setAttribute("data-i", String(i)); });
    rows.sort(function (a, b) {
      return compare(cellValue(a, col, type), cellValue(b, col, type), dir) ||
        (Number(a.getAttribute("data-i")) - Number(b.getAttribute("data-i")));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function initSorting() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      table.querySelectorAll("button.sort").forEach(function (btn) {
        btn.addEventListener("click", function () {
          var th = btn.closest("th");
          var type = btn.getAttribute("data-type");
          var dir = nextDir(th.getAttribute("aria-sort"), type);
          table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
          th.setAttribute("aria-sort", dir);
          sortTable(table, parseInt(btn.getAttribute("data-col"), 10), type, dir);
        });
      });
    });
  }

  // ------------------------------------------------------------------------------------------ filters (index)
  var ROW_KEYS = ["editor", "sadr", "protocol", "dataset", "origin"];

  function readHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i <= 0) return;
      try { out[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); } catch (e) { /* ignore */ }
    });
    return out;
  }

  function matches(el, state, keys) {
    return keys.every(function (k) {
      var want = state[k];
      if (!want) return true;
      var have = el.getAttribute("data-" + k);
      return have === null || have === "" || have === want;
    });
  }

  function initFilters() {
    var form = document.getElementById("filters");
    if (!form) return;
    var selects = Array.prototype.slice.call(form.querySelectorAll("select[data-filter]"));
    var defaults = {};
    selects.forEach(function (s) { defaults[s.getAttribute("data-filter")] = s.getAttribute("data-default") || ""; });
    var fromHash = readHash();
    selects.forEach(function (s) {
      var k = s.getAttribute("data-filter");
      var want = Object.prototype.hasOwnProperty.call(fromHash, k) ? fromHash[k] : defaults[k];
      s.value = want;
      if (s.value !== want) s.value = defaults[k];   // unknown value in the URL: fall back to the default
    });

    function state() {
      var st = {};
      selects.forEach(function (s) { st[s.getAttribute("data-filter")] = s.value; });
      return st;
    }

    function writeHash(st) {
      var parts = [];
      Object.keys(st).forEach(function (k) {
        if (st[k] !== defaults[k]) parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(st[k]));
      });
      try {
        history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
      } catch (e) { /* some hosts forbid it; the filters still work */ }
    }

    function apply() {
      var st = state();
      var shown = 0, total = 0;
      document.querySelectorAll("section.model").forEach(function (sec) {
        var secVisible = !st.model || sec.getAttribute("data-model") === st.model;
        sec.hidden = !secVisible;
        var visibleMain = 0;
        sec.querySelectorAll("tr[data-row]").forEach(function (tr) {
          var ok = secVisible && matches(tr, st, ROW_KEYS);
          tr.hidden = !ok;
          if (!tr.closest("table").classList.contains("delta")) {
            total += 1;
            if (ok) { shown += 1; visibleMain += 1; }
          }
        });
        var msg = sec.querySelector(".empty-msg");
        if (msg) msg.hidden = visibleMain > 0;
        sec.querySelectorAll("figure[data-protocol]").forEach(function (fig) {
          fig.hidden = !!st.protocol && fig.getAttribute("data-protocol") !== st.protocol;
        });
        sec.querySelectorAll("svg .mark").forEach(function (m) {
          if (matches(m, st, ["editor", "sadr", "dataset", "origin"])) m.removeAttribute("hidden");
          else m.setAttribute("hidden", "");
        });
      });
      var out = document.getElementById("row-count");
      if (out) out.textContent = shown + " of " + total + " rows shown";
      writeHash(st);
    }

    selects.forEach(function (s) { s.addEventListener("change", apply); });
    var reset = document.getElementById("reset-filters");
    if (reset) {
      reset.addEventListener("click", function () {
        selects.forEach(function (s) { s.value = defaults[s.getAttribute("data-filter")]; });
        apply();
      });
    }
    apply();
  }

  // ------------------------------------------------------------------------------------------ per-case drill-down
  function initCases() {
    var dataEl = document.getElementById("case-data");
    if (!dataEl) return;
    var D = JSON.parse(dataEl.textContent);
    var table = document.getElementById("case-table");
    var thead = table.tHead, tbody = table.tBodies[0];
    var ctl = {
      protocol: document.getElementById("case-protocol"),
      view: document.getElementById("case-view"),
      source: document.getElementById("case-source"),
      search: document.getElementById("case-search"),
      size: document.getElementById("case-page-size")
    };
    var driftKeys = Object.keys(D.drift || {});
    var cols = [{ id: "case_id", label: "case", type: "text" }, { id: "source", label: "source", type: "text" }];
    D.metrics.forEach(function (m) { cols.push({ id: m, label: m, type: "num", metric: true }); });
    driftKeys.forEach(function (k) { cols.push({ id: k, label: k.replace("_", " "), type: "num", drift: true }); });
    var sort = { col: null, dir: null };
    var page = 0;

    function rate(protocol, phase, m, i) {
      var n = D.n[phase][m][i];
      return n ? D.s[protocol][phase][m][i] / n : null;
    }

    function value(col, i) {
      if (col.id === "case_id") return D.case_id[i];
      if (col.id === "source") return D.source[i];
      if (col.drift) return D.drift[col.id][i];
      var p = ctl.protocol.value, v = ctl.view.value;
      if (v === "delta") {
        var a = rate(p, "pre", col.id, i), b = rate(p, "post", col.id, i);
        return a === null || b === null ? null : b - a;
      }
      return rate(p, v, col.id, i);
    }

    function text(col, i, v) {
      if (v === null || v === undefined) return "–";
      if (col.drift) return v.toFixed(4);
      if (!col.metric) return String(v);
      var t = (v * 100).toFixed(1);
      return ctl.view.value === "delta" && v > 0 ? "+" + t : t;
    }

    function header() {
      var tr = document.createElement("tr");
      cols.forEach(function (col, j) {
        var th = document.createElement("th");
        th.scope = "col";
        if (col.type === "num") th.className = "num";
        var b = document.createElement("button");
        b.type = "button";
        b.className = "sort";
        b.textContent = col.label;
        b.addEventListener("click", function () {
          var dir = nextDir(sort.col === j ? sort.dir : null, col.type);
          sort = { col: j, dir: dir };
          page = 0;
          render();
        });
        if (sort.col === j) th.setAttribute("aria-sort", sort.dir);
        th.appendChild(b);
        tr.appendChild(th);
      });
      while (thead.firstChild) thead.removeChild(thead.firstChild);
      thead.appendChild(tr);
    }

    function render() {
      var q = ctl.search.value.trim().toLowerCase();
      var src = ctl.source.value;
      var idx = [];
      for (var i = 0; i < D.case_id.length; i++) {
        if (src && D.source[i] !== src) continue;
        if (q && D.case_id[i].toLowerCase().indexOf(q) < 0) continue;
        idx.push(i);
      }
      if (sort.col !== null) {
        var col = cols[sort.col];
        idx.sort(function (a, b) {
          var va = value(col, a), vb = value(col, b);
          if (col.type === "text") { va = va === null ? null : String(va).toLowerCase(); vb = vb === null ? null : String(vb).toLowerCase(); }
          return compare(va, vb, sort.dir) || a - b;
        });
      }
      var size = parseInt(ctl.size.value, 10) || 100;
      var pages = Math.max(1, Math.ceil(idx.length / size));
      if (page >= pages) page = pages - 1;
      header();
      var frag = document.createDocumentFragment();
      idx.slice(page * size, (page + 1) * size).forEach(function (i) {
        var tr = document.createElement("tr");
        tr.setAttribute("data-case", D.case_id[i]);
        cols.forEach(function (col) {
          var cell = document.createElement(col.id === "case_id" ? "th" : "td");
          if (col.id === "case_id") cell.scope = "row";
          var v = value(col, i);
          cell.textContent = text(col, i, v);
          if (col.type === "num") {
            cell.className = "num" + (ctl.view.value === "delta" && col.metric && v ? (v > 0 ? " pos" : " neg") : "");
          }
          if (col.metric) {
            var n = D.n.post[col.id][i];
            cell.title = n + " prompt" + (n === 1 ? "" : "s");
          }
          tr.appendChild(cell);
        });
        frag.appendChild(tr);
      });
      while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
      tbody.appendChild(frag);
      document.getElementById("case-page").textContent =
        "page " + (page + 1) + " of " + pages + " · " + idx.length + " of " + D.case_id.length + " cases";
      document.getElementById("case-prev").disabled = page === 0;
      document.getElementById("case-next").disabled = page >= pages - 1;
    }

    ["protocol", "view", "source", "size"].forEach(function (k) {
      ctl[k].addEventListener("change", function () { page = 0; render(); });
    });
    ctl.search.addEventListener("input", function () { page = 0; render(); });
    document.getElementById("case-prev").addEventListener("click", function () { page -= 1; render(); });
    document.getElementById("case-next").addEventListener("click", function () { page += 1; render(); });
    render();
  }

  function init() {
    initSorting();
    initFilters();
    initCases();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
