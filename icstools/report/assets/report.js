/* icstools drift report: the interactive panels, drawn with uPlot from the page's JSON blocks.
   Every user-given text (site, unit, run and label names) is set with textContent, never
   parsed as HTML. window.icsReport exposes the plots and what they show (used by the tests). */
(function () {
  "use strict";
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#e6550d", "#31a354", "#ad494a", "#756bb1",
    "#843c39", "#d6616b", "#636363", "#8ca252", "#3182bd"];
  var R = window.icsReport = { plots: {}, shown: {}, runs: {} };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function parse(id) { return JSON.parse(document.getElementById(id).textContent); }

  /* Packed arrays (icstools.report.interactive.pack): two characters per value, 4,095 levels
     between lo and hi ("__" missing), or with p.log 4,094 levels of log10 and "_-" for zero;
     nested to p.shape. */
  var ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", IDX = {};
  for (var a = 0; a < ALPHA.length; a++) IDX[ALPHA.charAt(a)] = a;
  function unpack(p) {
    if (!p || typeof p.s !== "string") return p;
    var n = p.s.length / 2, flat = new Array(n), span = p.hi - p.lo;
    for (var i = 0; i < n; i++) {
      var k = IDX[p.s.charAt(2 * i)] * 64 + IDX[p.s.charAt(2 * i + 1)];
      if (k === 4095) { flat[i] = null; continue; }
      if (p.log && k === 4094) { flat[i] = 0; continue; }
      flat[i] = p.log ? Math.pow(10, p.lo + span * k / 4093) : p.lo + span * k / 4094;
    }
    function nest(off, dims) {
      if (dims.length === 1) return flat.slice(off, off + dims[0]);
      var size = dims.slice(1).reduce(function (x, y) { return x * y; }, 1), out = [];
      for (var j = 0; j < dims[0]; j++) out.push(nest(off + j * size, dims.slice(1)));
      return out;
    }
    return p.shape.length ? nest(0, p.shape) : flat;
  }
  function decode(d) {
    d.lines.forEach(function (b) { b.values = unpack(b.values); });
    if (d.units) Object.keys(d.units.sites).forEach(function (s) {
      var u = d.units.sites[s];
      u.q = unpack(u.q); u.mean = unpack(u.mean); u.site_q = unpack(u.site_q);
    });
    if (d.hist) d.hist.shares = d.hist.shares.map(unpack);
    return d;
  }
  function width(node) {
    var w = node.clientWidth || (node.parentNode && node.parentNode.clientWidth) || 900;
    return Math.max(320, Math.min(1100, w - 10));
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    var a = Math.abs(v);
    return (a >= 1e5 || (a < 1e-3 && a !== 0)) ? v.toExponential(3) : String(+v.toPrecision(4));
  }
  function positive(a) { return a.map(function (v) { return v !== null && v > 0 ? v : null; }); }
  function anyPositive(ys) {
    return ys.some(function (a) { return a.some(function (v) { return v !== null && v > 0; }); });
  }
  function select(bar, label, cls) {
    var lab = el("label", "ics-label", label + " ");
    var s = el("select", cls);
    lab.appendChild(s);
    bar.appendChild(lab);
    return s;
  }
  function options(sel, items) {
    while (sel.firstChild) sel.removeChild(sel.firstChild);
    items.forEach(function (it) {
      var o = el("option", null, it[1]);
      o.value = String(it[0]);
      sel.appendChild(o);
    });
  }

  /* A line plot: x values, one array per named line; o: log, ylabel, colors, fills, bands,
     paths, xlabel, height. Replaces the plot of the same key. */
  function plot(key, host, title, x, names, ys, o) {
    o = o || {};
    var log = !!o.log && anyPositive(ys);
    var series = [{ label: o.xlabel || "step" }];
    names.forEach(function (n, i) {
      var s = {
        label: n,
        stroke: (o.colors && o.colors[i]) || COLORS[i % COLORS.length],
        width: o.widths ? o.widths[i] : 1.25,
        value: function (u, v) { return fmt(v); }
      };
      if (o.fills && o.fills[i]) s.fill = o.fills[i];
      if (o.paths) { s.paths = o.paths; s.points = { show: false }; }
      if (o.dash && o.dash[i]) s.dash = o.dash[i];
      series.push(s);
    });
    var opts = {
      title: title,
      width: width(host),
      height: o.height || 260,
      series: series,
      scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
      axes: [{ label: o.xlabel || "step" }, {
        label: (o.ylabel || "") + (log ? " (log)" : ""), size: 72,
        values: function (u, vals) {
          if (!log) return vals.map(fmt);
          // log scale: label the powers of ten only, every other one when there are many
          var decades = vals.filter(function (v) { return Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-6; });
          var step = decades.length > 8 ? 2 : 1;
          return vals.map(function (v) {
            var e = Math.log10(v), r = Math.round(e);
            return Math.abs(e - r) < 1e-6 && r % step === 0 ? (Math.abs(r) >= 4 ? "1e" + r : fmt(v)) : "";
          });
        }
      }],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } }
    };
    if (o.bands) opts.bands = o.bands;
    if (R.plots[key]) R.plots[key].destroy();
    while (host.firstChild) host.removeChild(host.firstChild);
    var u = new uPlot(opts, [x].concat(log ? ys.map(positive) : ys), host);
    R.plots[key] = u;
    return u;
  }

  function scalarsPanel(host, id, d) {
    var names = Object.keys(d.scalars);
    if (!names.length) return;
    var box = el("div", "ics-panel");
    host.appendChild(box);
    var bar = el("div", "ics-controls");
    box.appendChild(bar);
    var sel = select(bar, "logged value", "ics-scalar");
    options(sel, names.map(function (n) { return [n, n]; }));
    if (names.indexOf("loss") >= 0) sel.value = "loss";
    var area = el("div", "ics-plot");
    box.appendChild(area);
    var cb = null;
    function draw() {
      var n = sel.value;
      plot(id + "/scalar", area, "Logged value: " + n, d.steps, [n], [d.scalars[n]],
        { log: cb ? cb.checked : false, ylabel: n });
      R.shown[id + "/scalar"] = n;
    }
    sel.addEventListener("change", draw);
    cb = logToggle(bar, false, draw);
  }

  /* A checkbox "log scale" that calls draw(checked) now and on every change. */
  function logToggle(bar, initial, draw) {
    var lab = el("label", "ics-label");
    var cb = el("input", "ics-log");
    cb.type = "checkbox";
    cb.checked = !!initial;
    lab.appendChild(cb);
    lab.appendChild(document.createTextNode(" log scale"));
    bar.appendChild(lab);
    cb.addEventListener("change", function () { draw(cb.checked); });
    draw(cb.checked);
    return cb;
  }

  function linesPanels(host, id, d, from, to) {
    d.lines.forEach(function (b, i) {
      if (i < from || i >= to) return;
      var box = el("div", "ics-panel");
      host.appendChild(box);
      var bar = el("div", "ics-controls");
      box.appendChild(bar);
      var area = el("div", "ics-plot");
      box.appendChild(area);
      logToggle(bar, b.log, function (log) {
        plot(id + "/lines/" + i, area, b.title, d.steps, b.names, b.values,
          { log: log, ylabel: b.ylabel });
      });
      if (b.note) box.appendChild(el("p", "small", b.note));
    });
  }

  /* Viridis-like colour of t in [0, 1]. */
  var STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(t) {
    t = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
    var i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }

  function drawHist(box, key, h, si, site, source) {
    while (box.firstChild) box.removeChild(box.firstChild);
    var grid = h.shares[si], edges = h.edges[si], steps = h.steps;
    box.appendChild(el("div", "ics-title", "Histogram of " + site + " over time (" + source +
      "): each column one record, colour = share of its values in the bin (square-root scale)"));
    var W = width(box), H = 260, L = 78, B = 28, T = 6, Rm = 10;
    var c = el("canvas", "ics-canvas");
    c.width = W; c.height = H;
    box.appendChild(c);
    var read = el("div", "small ics-readout", "hover for values");
    box.appendChild(read);
    var ctx = c.getContext("2d");
    var nx = grid.length, nb = nx ? grid[0].length : 0, max = 0;
    grid.forEach(function (col) { col.forEach(function (v) { if (v !== null && v > max) max = v; }); });
    var cw = (W - L - Rm) / Math.max(1, nx), rh = (H - B - T) / Math.max(1, nb);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    for (var i = 0; i < nx; i++) {
      for (var j = 0; j < nb; j++) {
        var v = grid[i][j];
        ctx.fillStyle = v === null ? "#ddd" : colour(max > 0 ? Math.sqrt(v / max) : 0);
        ctx.fillRect(L + i * cw, H - B - (j + 1) * rh, Math.ceil(cw), Math.ceil(rh));
      }
    }
    ctx.fillStyle = "#222"; ctx.font = "11px sans-serif"; ctx.textAlign = "right";
    ctx.fillText("under", L - 4, H - B - 1); ctx.fillText("over", L - 4, T + 9);
    ctx.fillText(fmt(edges[0]), L - 4, H - B - 16);
    ctx.fillText(fmt(edges[edges.length - 1]), L - 4, T + 24);
    ctx.fillText(fmt((edges[0] + edges[edges.length - 1]) / 2), L - 4, (H - B + T) / 2 + 4);
    ctx.textAlign = "center";
    [0, Math.floor((nx - 1) / 2), nx - 1].forEach(function (i) {
      if (i >= 0 && i < nx) ctx.fillText(String(steps[i]), L + (i + 0.5) * cw, H - 10);
    });
    ctx.fillText("step", L + (W - L - Rm) / 2, H - 0);
    c.addEventListener("mousemove", function (ev) {
      var r = c.getBoundingClientRect();
      var i = Math.floor((ev.clientX - r.left - L) / cw), j = Math.floor((H - B - (ev.clientY - r.top)) / rh);
      if (i < 0 || i >= nx || j < 0 || j >= nb) return;
      var lo = j === 0 ? "−∞" : fmt(edges[j - 1]), hi = j === nb - 1 ? "+∞" : fmt(edges[j]);
      read.textContent = "step " + steps[i] + ", values in [" + lo + ", " + hi + "): " +
        (grid[i][j] === null ? "no values" : (100 * grid[i][j]).toFixed(2) + "%");
    });
    R.plots[key] = { site: site, canvas: c, shares: grid };
  }

  function drawOverlay(box, key, h, si, site, item) {
    while (box.firstChild) box.removeChild(box.firstChild);
    if (!item) {
      box.appendChild(el("p", "note", "No reference-vs-current histogram for " + site + "."));
      R.plots[key] = null;
      return;
    }
    var e = h.edges[si], w = e.length > 1 ? e[1] - e[0] : 1, x = [e[0] - w / 2];
    for (var i = 1; i < e.length; i++) x.push((e[i - 1] + e[i]) / 2);
    x.push(e[e.length - 1] + w / 2);
    var title = site + ": step " + item.step + " (current) vs step " + item.ref_step +
      " (reference: the previous record); W1/σ " + fmt(item.w1_std) +
      (item.flagged ? ", flagged (threshold " + fmt(item.threshold) + ")" : ", the site's largest drift (not flagged)");
    plot(key, box, title, x, ["reference (step " + item.ref_step + ")", "current (step " + item.step + ")"],
      [item.ref, item.cur], {
        xlabel: "value (outer bars: under/overflow)", ylabel: "share of values",
        colors: ["#555", "#c0392b"], fills: ["rgba(120,120,120,0.45)", "rgba(192,57,43,0.40)"],
        paths: uPlot.paths.bars({ size: [1, Infinity], align: 0 })
      });
  }

  function drillPanel(host, id, d) {
    if (!d.sites.length || !(d.units || d.hist)) return;
    var box = el("div", "ics-panel ics-drill");
    host.appendChild(box);
    box.appendChild(el("h4", null, "Drill-down: one site, one unit"));
    var bar = el("div", "ics-controls");
    box.appendChild(bar);
    var siteSel = select(bar, "site", "ics-site");
    options(siteSel, d.sites.map(function (s) { return [s, s]; }));
    var unitSel = select(bar, "unit", "ics-unit");
    var stepSel = select(bar, "flagged step", "ics-step");
    var uArea = el("div", "ics-plot"), hArea = el("div", "ics-plot ics-hist"), oArea = el("div", "ics-plot");
    box.appendChild(uArea); box.appendChild(hArea); box.appendChild(oArea);
    function units() {
      var site = siteSel.value, u = d.units && d.units.sites[site];
      if (!u) { uArea.textContent = "No per-unit percentiles recorded for this site."; return; }
      var k = +unitSel.value, p = d.units.percentiles.map(function (q) { return Math.round(q * 100) + "th"; });
      var blue = ["#9ecae1", "#1f77b4", "#9ecae1"], band = [{ series: [3, 1], fill: "rgba(31,119,180,0.12)" }];
      if (k < 0) {
        plot(id + "/units", uArea, site + ": percentiles of its units over steps (median over the site's " +
          u.n_units + " units)", d.units.steps, p.map(function (s) { return s + " percentile"; }), u.site_q,
          { colors: blue, bands: band, ylabel: "activation" });
      } else {
        var ys = u.q[k].slice(), names = p.map(function (s) { return s + " percentile"; });
        if (u.mean) { ys.push(u.mean[k]); names.push("mean"); }
        plot(id + "/units", uArea, site + ", unit " + u.unit_index[k] + ": percentiles and mean over steps",
          d.units.steps, names, ys, { colors: blue.concat(["#ff7f0e"]), bands: band, ylabel: "activation" });
      }
      R.shown[id + "/units"] = site + "|" + (k < 0 ? "all" : u.unit_index[k]);
    }
    function overlay() {
      var site = siteSel.value, items = (d.overlays && d.overlays[site]) || [];
      var si = d.sites.indexOf(site);
      if (d.hist) drawOverlay(oArea, id + "/overlay", d.hist, si, site, items[+stepSel.value]);
      R.shown[id + "/overlay"] = site + "|" + (items.length ? items[+stepSel.value].step : "none");
    }
    function showSite() {
      var site = siteSel.value, u = d.units && d.units.sites[site];
      var ulist = [[-1, "all units (median)"]];
      if (u) u.unit_index.forEach(function (ix, k) { ulist.push([k, "unit " + ix]); });
      options(unitSel, ulist);
      var items = (d.overlays && d.overlays[site]) || [];
      options(stepSel, items.map(function (it, k) {
        return [k, "step " + it.step + (it.flagged ? " (flagged)" : " (largest drift, not flagged)")];
      }));
      if (!items.length) options(stepSel, [[-1, "none"]]);
      units();
      if (d.hist) drawHist(hArea, id + "/hist", d.hist, d.sites.indexOf(site), site, d.source);
      overlay();
      R.shown[id + "/site"] = site;
    }
    siteSel.addEventListener("change", showSite);
    unitSel.addEventListener("change", units);
    stepSel.addEventListener("change", overlay);
    showSite();
  }

  function comparePanel(host) {
    var d = parse(host.getAttribute("data-src"));
    var bar = el("div", "ics-controls");
    host.appendChild(bar);
    var sel = select(bar, "site", "ics-site");
    options(sel, d.sites.map(function (s) { return [s, s]; }));
    var area = el("div", "ics-plot");
    host.appendChild(area);
    function draw() {
      var site = sel.value;
      plot("compare", area, "Drift of " + site + " in every run (median W1/σ vs the previous record)",
        d.steps, d.runs.map(function (r) { return r.label; }),
        d.runs.map(function (r) { return r.drift[site] || d.steps.map(function () { return null; }); }),
        { colors: d.runs.map(function (r) { return COLORS[r.group % COLORS.length]; }), ylabel: "W1/σ" });
      R.shown.compare = site;
    }
    sel.addEventListener("change", draw);
    draw();
  }

  function build() {
    Array.prototype.forEach.call(document.querySelectorAll(".ics-run"), function (host) {
      var id = host.getAttribute("data-run"), d = decode(parse(host.getAttribute("data-src")));
      R.runs[id] = d;
      host.appendChild(el("p", "small", "Drag across a plot to zoom into steps, double-click to " +
        "zoom out, hover for values, click a legend entry to hide or show its line."));
      if (d.thinned) host.appendChild(el("p", "note", "This run has " + d.thinned +
        " records; the time series show " + d.steps.length + " of them, evenly spread."));
      // drift first (what the flags read), then its drill-down, the other series, the scalars
      linesPanels(host, id, d, 0, 1);
      drillPanel(host, id, d);
      linesPanels(host, id, d, 1, d.lines.length);
      scalarsPanel(host, id, d);
    });
    var cmp = document.getElementById("ics-compare");
    if (cmp) comparePanel(cmp);
    R.ready = true;
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", build);
  else build();
})();
