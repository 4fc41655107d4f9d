/* tdiag report charts: draws the chart specs of the JSON block with id "tdiag-charts"
 * into every [data-tdiag-chart] box. Line charts with uPlot, heatmaps on a canvas.
 * No network, no eval, no innerHTML: every name from the run is set as textContent. */
(function () {
  "use strict";
  var dataEl = document.getElementById("tdiag-charts");
  var api = { charts: {}, ema: ema };
  window.tdiag = api;
  if (!dataEl) return;
  var specs = JSON.parse(dataEl.textContent);
  var MARK_GAP = 0.05;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // TensorBoard's smoothing: EMA from 0, debiased by 1 - w^k; nulls and non-finite pass.
  function ema(values, w) {
    var out = new Array(values.length), last = 0, k = 0;
    for (var i = 0; i < values.length; i++) {
      var v = values[i];
      if (v === null || v === undefined || !isFinite(v)) { out[i] = v === undefined ? null : v; continue; }
      last = last * w + (1 - w) * v;
      k++;
      out[i] = w > 0 ? last / (1 - Math.pow(w, k)) : v;
    }
    return out;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    var a = Math.abs(v);
    if (a >= 1e4) {
      if (a >= 1e9) return (v / 1e9).toPrecision(4).replace(/\.?0+$/, "") + "G";
      if (a >= 1e6) return (v / 1e6).toPrecision(4).replace(/\.?0+$/, "") + "M";
      return (v / 1e3).toPrecision(4).replace(/\.?0+$/, "") + "k";
    }
    if (a !== 0 && (a < 1e-3)) return v.toExponential(1).replace(".0e", "e");
    return String(Number(v.toPrecision(4)));
  }

  function interp(x, xs, ys) { // piecewise-linear lookup, xs ascending
    var n = xs.length;
    if (!n) return x;
    if (x <= xs[0]) return ys[0];
    if (x >= xs[n - 1]) return ys[n - 1];
    var lo = 0, hi = n - 1;
    while (hi - lo > 1) { var mid = (lo + hi) >> 1; if (xs[mid] <= x) lo = mid; else hi = mid; }
    var t = xs[hi] === xs[lo] ? 0 : (x - xs[lo]) / (xs[hi] - xs[lo]);
    return ys[lo] + t * (ys[hi] - ys[lo]);
  }

  function csvCell(v) {
    if (v === null || v === undefined) return "";
    var s = String(v);
    if (/^[=+\-@\t\r]/.test(s) && isNaN(Number(s))) s = "'" + s; // no formula in a spreadsheet
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function download(name, header, columns) {
    var lines = [header.map(csvCell).join(",")];
    var n = columns.length ? columns[0].length : 0;
    for (var i = 0; i < n; i++) lines.push(columns.map(function (c) { return csvCell(c[i]); }).join(","));
    var blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    var a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = name + ".csv";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 0);
  }

  function toolbar(box) {
    var bar = el("div", "tools");
    box.appendChild(bar);
    return bar;
  }

  function checkbox(bar, label, checked, onchange) {
    var lab = el("label", "tool");
    var input = el("input");
    input.type = "checkbox";
    input.checked = checked;
    input.addEventListener("change", function () { onchange(input.checked); });
    lab.appendChild(input);
    lab.appendChild(document.createTextNode(" " + label));
    bar.appendChild(lab);
    return input;
  }

  function button(bar, label, onclick) {
    var b = el("button", "tool", label);
    b.type = "button";
    b.addEventListener("click", onclick);
    bar.appendChild(b);
    return b;
  }

  function plotWidth(box) { return Math.max(240, Math.floor(box.clientWidth || 480)); }

  // Finding marks, threshold lines and non-finite crosses, drawn over a uPlot panel.
  function overlay(u, spec, state, panel) {
    var ctx = u.ctx, bb = u.bbox, dpr = uPlot.pxRatio;
    ctx.save();
    ctx.beginPath();
    ctx.rect(bb.left, bb.top - 20 * dpr, bb.width, bb.height + 20 * dpr);
    ctx.clip();
    var xs = spec.x[spec.base], ax = spec.x[state.axis];
    var pos = function (step) { return u.valToPos(interp(step, xs, ax), "x", true); };
    var labelled = [];
    spec.marks.forEach(function (m) {
      var x0 = pos(m.step);
      ctx.strokeStyle = m.color;
      ctx.globalAlpha = m.primary ? 0.85 : 0.35;
      if (m.end !== null && m.end > m.step) {
        var x1 = pos(m.end);
        ctx.globalAlpha = 0.08;
        ctx.fillStyle = m.color;
        ctx.fillRect(x0, bb.top, Math.max(1, x1 - x0), bb.height);
        ctx.globalAlpha = 0.6;
      }
      ctx.lineWidth = dpr;
      ctx.setLineDash([4 * dpr, 3 * dpr]);
      ctx.beginPath(); ctx.moveTo(x0, bb.top); ctx.lineTo(x0, bb.top + bb.height); ctx.stroke();
      if (m.primary) labelled.push({ x: x0, label: m.label, color: m.color });
    });
    ctx.setLineDash([]);
    ctx.globalAlpha = 1;
    if (panel === 0) {
      labelled.sort(function (a, b) { return a.x - b.x; });
      var clusters = [];
      labelled.forEach(function (m) {
        var last = clusters[clusters.length - 1];
        if (last && (m.x - last.x) / bb.width < MARK_GAP + 0.012 * last.labels.join(",").length) {
          if (last.labels.indexOf(m.label) < 0) last.labels.push(m.label);
          if (last.color !== m.color) last.color = "#333333";
          return;
        }
        clusters.push({ x: m.x, labels: [m.label], color: m.color });
      });
      ctx.font = "bold " + 11 * dpr + "px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "bottom";
      clusters.forEach(function (c) {
        if (c.x < bb.left - 1 || c.x > bb.left + bb.width + 1) return;
        ctx.fillStyle = c.color;
        ctx.fillText(c.labels.join(","), c.x, bb.top - 3 * dpr);
      });
      spec.hlines.forEach(function (h) {
        var y = u.valToPos(h.y, "y", true);
        if (!isFinite(y) || y < bb.top || y > bb.top + bb.height) return;
        ctx.strokeStyle = "#6d4c41";
        ctx.lineWidth = 1.4 * dpr;
        ctx.setLineDash([2 * dpr, 3 * dpr]);
        ctx.beginPath(); ctx.moveTo(bb.left, y); ctx.lineTo(bb.left + bb.width, y); ctx.stroke();
      });
      ctx.setLineDash([]);
      spec.nonfinite.forEach(function (nf) {
        ctx.strokeStyle = nf.color;
        ctx.lineWidth = 1.5 * dpr;
        var y = bb.top + 6 * dpr, r = 4 * dpr;
        nf.steps.forEach(function (s) {
          var x = pos(s);
          if (x < bb.left || x > bb.left + bb.width) return;
          ctx.beginPath();
          ctx.moveTo(x - r, y - r); ctx.lineTo(x + r, y + r);
          ctx.moveTo(x - r, y + r); ctx.lineTo(x + r, y - r);
          ctx.stroke();
        });
      });
    }
    ctx.restore();
  }

  function lines(box, spec) {
    if (!spec.base) spec.base = Object.keys(spec.x)[0];
    var state = { axis: spec.base, log: !!spec.panels[0].log, smooth: spec.smoothing, range: null, hidden: {} };
    var axisNames = Object.keys(spec.x).filter(function (k) { return k !== spec.base; });
    axisNames.unshift(spec.base);
    var bar = toolbar(box);
    var rangeText = el("span", "range muted");
    var holder = el("div", "plots");
    var legendExtra = el("div", "extra-legend");
    box.appendChild(holder);
    box.appendChild(legendExtra);
    var plots = [];

    checkbox(bar, "log scale", state.log, function (on) { state.log = on; rebuild(); }).className = "log-toggle";
    if (spec.smoothing !== null) {
      var lab = el("label", "tool smoothing");
      lab.appendChild(document.createTextNode("smoothing "));
      var slider = el("input");
      slider.type = "range"; slider.min = "0"; slider.max = "0.999"; slider.step = "0.001";
      slider.value = String(spec.smoothing);
      var shown = el("span", "smoothing-value", Number(spec.smoothing).toFixed(3));
      slider.addEventListener("input", function () {
        state.smooth = Number(slider.value);
        shown.textContent = state.smooth.toFixed(3);
        plots.forEach(function (p) { p.u.setData(data(p.panel), false); p.u.redraw(); });
      });
      lab.appendChild(slider); lab.appendChild(shown);
      bar.appendChild(lab);
    }
    if (axisNames.length > 1) {
      var sel = el("select", "tool x-axis");
      axisNames.forEach(function (k) {
        var o = el("option", null, "x: " + (spec.xlabels[k] || k));
        o.value = k;
        sel.appendChild(o);
      });
      sel.addEventListener("change", function () { state.axis = sel.value; state.range = null; rebuild(); });
      bar.appendChild(sel);
    }
    button(bar, "reset zoom", function () { state.range = null; rebuild(); }).classList.add("reset");
    button(bar, "CSV", function () {
      var header = [spec.xlabels[state.axis] || state.axis];
      var cols = [spec.x[state.axis]];
      if (state.axis !== spec.base) { header.push(spec.xlabels[spec.base] || spec.base); cols.push(spec.x[spec.base]); }
      spec.series.forEach(function (s) {
        header.push(s.label); cols.push(s.values);
        if (s.smooth && state.smooth !== null) { header.push(s.label + " (smoothed " + state.smooth + ")"); cols.push(ema(s.values, state.smooth)); }
      });
      download(spec.key, header, cols);
    }).classList.add("csv");
    bar.appendChild(rangeText);

    var extras = [];
    spec.hlines.forEach(function (h) { extras.push({ text: "┄ " + h.label, color: "#6d4c41" }); });
    spec.nonfinite.forEach(function (nf) { extras.push({ text: "× " + nf.label + " (" + nf.steps.length + ")", color: nf.color }); });
    extras.forEach(function (x) { var s = el("span", "item", x.text); s.style.color = x.color; legendExtra.appendChild(s); });

    function showRange(min, max) {
      rangeText.textContent = (spec.xlabels[state.axis] || state.axis) + " " + fmt(min) + " – " + fmt(max);
      box.dataset.xMin = String(min);
      box.dataset.xMax = String(max);
    }

    function seriesOf(panel) {
      return spec.series.filter(function (s) { return s.panel === panel; });
    }

    function data(panel) {
      var out = [spec.x[state.axis]];
      var logy = panel === 0 && state.log;
      seriesOf(panel).forEach(function (s) {
        var v = s.values;
        if (logy) v = v.map(function (y) { return y !== null && y > 0 ? y : null; });
        out.push(v);
        if (s.smooth && state.smooth !== null) out.push(ema(v, state.smooth));
      });
      return out;
    }

    function uSeries(panel) {
      var list = [{ label: spec.xlabels[state.axis] || state.axis, value: function (u, v) { return fmt(v); } }];
      seriesOf(panel).forEach(function (s) {
        var smoothed = s.smooth && state.smooth !== null;
        list.push({
          label: s.label + (smoothed ? " (raw)" : ""),
          show: !state.hidden[s.label + (smoothed ? " (raw)" : "")],
          stroke: s.color,
          width: smoothed ? 1 : 1.4,
          alpha: smoothed ? 0.35 : 1,
          dash: s.dash && s.dash.length ? s.dash : undefined,
          spanGaps: true,
          points: { show: s.points, size: 5, fill: s.color },
          value: function (u, v) { return fmt(v); },
        });
        if (smoothed) list.push({ label: s.label + " (smoothed)", show: !state.hidden[s.label + " (smoothed)"], stroke: s.color, width: 2, spanGaps: true, points: { show: false }, value: function (u, v) { return fmt(v); } });
      });
      return list;
    }

    function yRange(panel) {
      var p = spec.panels[panel];
      return function (u, min, max) {
        if (panel === 0) { // threshold lines (clip, GPU capacity) stay in view, as before
          spec.hlines.forEach(function (h) {
            if (state.log && h.y <= 0) return;
            min = min === null ? h.y : Math.min(min, h.y);
            max = max === null ? h.y : Math.max(max, h.y);
          });
        }
        if (panel === 0 && state.log) return uPlot.rangeLog(min, max, 10, true);
        if (min === null || max === null) return [0, 1];
        var span = max - min || Math.abs(max) || 1;
        var lo = p.zero && min >= 0 ? 0 : min - 0.05 * span;
        return [lo, max + 0.05 * span];
      };
    }

    // Room for the widest tick label (uPlot draws them on the canvas, so measure there).
    function yAxisSize(u, values, axisIdx, cycleNum) {
      var axis = u.axes[axisIdx];
      if (cycleNum > 1) return axis._size;
      var w = 0, ctx = u.ctx;
      ctx.font = axis.font[0];
      (values || []).forEach(function (v) { w = Math.max(w, ctx.measureText(v).width); });
      return Math.max(50, Math.ceil(w / uPlot.pxRatio) + 18);
    }

    function build(panel, width, height) {
      var xs = spec.x[state.axis];
      var opts = {
        width: width,
        height: height,
        padding: [panel === 0 ? 18 : 6, 12, 0, 0],
        cursor: { sync: { key: "tdiag-" + spec.key, setSeries: false }, drag: { x: true, y: false, setScale: true } },
        legend: { live: true },
        scales: { x: { time: false }, y: { distr: panel === 0 && state.log ? 3 : 1, log: 10, range: yRange(panel) } },
        axes: [
          { label: panel === spec.panels.length - 1 ? spec.xlabels[state.axis] : undefined, values: function (u, vals) { return vals.map(fmt); }, size: 36 },
          { label: spec.panels[panel].label + (panel === 0 && state.log ? " (log)" : ""), values: function (u, vals) { return vals.map(fmt); }, size: yAxisSize },
        ],
        series: uSeries(panel),
        hooks: {
          draw: [function (u) { overlay(u, spec, state, panel); }],
          setSeries: [function (u, i, o) { // a hidden series stays hidden across rebuilds
            if (i !== null && o && o.show !== undefined) state.hidden[u.series[i].label] = !o.show;
          }],
          setScale: [function (u, key) {
            if (key !== "x") return;
            var min = u.scales.x.min, max = u.scales.x.max;
            var lo = xs.length ? xs[0] : min, hi = xs.length ? xs[xs.length - 1] : max;
            if (state.axis === spec.base && spec.xrange) { lo = Math.min(lo, spec.xrange[0]); hi = Math.max(hi, spec.xrange[1]); }
            var full = min <= lo && max >= hi;
            if (min === null || max === null) return;
            state.range = full ? null : [min, max];
            showRange(min, max);
            plots.forEach(function (p) {
              if (p.u !== u && (p.u.scales.x.min !== min || p.u.scales.x.max !== max)) p.u.setScale("x", { min: min, max: max });
            });
          }],
        },
      };
      if (xs.length === 1) opts.scales.x.range = function (u, a, b) { return [a - 1, b + 1]; };
      var target = el("div", "panel panel-" + panel);
      holder.appendChild(target);
      var u = new uPlot(opts, data(panel), target);
      return { u: u, panel: panel };
    }

    function rebuild() {
      var keep = state.range;
      plots.forEach(function (p) { p.u.destroy(); });
      holder.textContent = "";
      plots = [];
      var width = plotWidth(box), phone = width < 420;
      for (var panel = 0; panel < spec.panels.length; panel++) {
        plots.push(build(panel, width, panel === 0 ? (phone ? 210 : 250) : 130));
      }
      var xs = spec.x[state.axis];
      var shared = state.axis === spec.base && spec.xrange; // the run's steps: charts line up
      if (keep) plots[0].u.setScale("x", { min: keep[0], max: keep[1] });
      else if (shared) plots[0].u.setScale("x", { min: shared[0], max: shared[1] });
      else if (xs.length) showRange(xs[0], xs[xs.length - 1]);
      api.charts[spec.key] = { spec: spec, state: state, plots: plots.map(function (p) { return p.u; }) };
    }

    rebuild();
    var last = plotWidth(box);
    window.addEventListener("resize", function () {
      var w = plotWidth(box);
      if (w !== last) { last = w; plots.forEach(function (p) { p.u.setSize({ width: w, height: p.u.height }); }); }
    });
  }

  // viridis, 9 stops
  var VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function viridis(t) {
    t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    var i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return "rgb(" + Math.round(a[0] + f * (b[0] - a[0])) + "," + Math.round(a[1] + f * (b[1] - a[1])) + "," + Math.round(a[2] + f * (b[2] - a[2])) + ")";
  }

  function niceRound(v, step) { // a tick value rounded to 2 significant digits of its spacing
    var p = Math.pow(10, Math.floor(Math.log10(Math.max(step, 1e-12)))) / 10;
    return Math.round(v / p) * p;
  }

  function heatmap(box, spec) {
    var state = { log: !!spec.log, lo: 0, hi: spec.ncols - 1 };
    var rows = spec.rows, nc = spec.ncols, z = spec.z;
    var bar = toolbar(box);
    checkbox(bar, "log colour", state.log, function (on) { state.log = on; draw(); }).className = "log-toggle";
    button(bar, "reset zoom", function () { state.lo = 0; state.hi = nc - 1; draw(); }).classList.add("reset");
    button(bar, "CSV", function () {
      var header = ["first step", "last step"].concat(rows), cols = [spec.x0, spec.x1];
      rows.forEach(function (r, i) { cols.push(z.slice(i * nc, (i + 1) * nc)); });
      download(spec.key, header, cols);
    }).classList.add("csv");
    var rangeText = el("span", "range muted");
    bar.appendChild(rangeText);
    var wrap = el("div", "heat");
    var canvas = el("canvas");
    var tip = el("div", "tdtip");
    tip.hidden = true;
    wrap.appendChild(canvas); wrap.appendChild(tip);
    box.appendChild(wrap);
    var scale = el("div", "colour-scale muted");
    box.appendChild(scale);
    var geo = null;

    function value(v) { return state.log ? (v > 0 ? Math.log10(v) : null) : v; }

    function draw() {
      var dpr = window.devicePixelRatio || 1;
      var width = plotWidth(box), ctx = canvas.getContext("2d");
      ctx.font = "11px system-ui, sans-serif";
      var labelW = 0;
      rows.forEach(function (r) { labelW = Math.max(labelW, ctx.measureText(r).width); });
      var left = Math.min(Math.ceil(labelW) + 8, Math.floor(width * 0.4));
      var rowH = Math.max(10, Math.min(18, Math.floor(360 / Math.max(1, rows.length))));
      var top = 18, plotH = rowH * rows.length, height = top + plotH + 28;
      canvas.width = width * dpr; canvas.height = height * dpr;
      canvas.style.width = width + "px"; canvas.style.height = height + "px";
      ctx = canvas.getContext("2d");
      ctx.scale(dpr, dpr);
      ctx.font = "11px system-ui, sans-serif";
      var plotW = width - left - 10, ncol = state.hi - state.lo + 1, cw = plotW / ncol;
      var vmin = Infinity, vmax = -Infinity;
      for (var i = 0; i < z.length; i++) { var v = z[i] === null ? null : value(z[i]); if (v !== null && isFinite(v)) { if (v < vmin) vmin = v; if (v > vmax) vmax = v; } }
      if (!isFinite(vmin)) { vmin = 0; vmax = 1; }
      var span = vmax - vmin || 1;
      for (var r = 0; r < rows.length; r++) {
        for (var c = state.lo; c <= state.hi; c++) {
          var raw = z[r * nc + c], t = raw === null ? null : value(raw);
          ctx.fillStyle = t === null || !isFinite(t) ? "#eeeeee" : viridis((t - vmin) / span);
          ctx.fillRect(left + (c - state.lo) * cw, top + r * rowH, Math.ceil(cw), rowH);
        }
        ctx.fillStyle = "#333333";
        ctx.textAlign = "right"; ctx.textBaseline = "middle";
        var label = rows[r];
        while (label.length > 3 && ctx.measureText(label).width > left - 6) label = "…" + label.slice(2);
        ctx.fillText(label, left - 4, top + r * rowH + rowH / 2);
      }
      var s0 = spec.x0[state.lo], s1 = spec.x1[state.hi];
      var stepX = function (s) { return left + (s - s0) / ((s1 - s0) || 1) * plotW; };
      ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillStyle = "#333333";
      for (var k = 0; k <= 4; k++) {
        var sv = k === 0 ? s0 : k === 4 ? s1 : niceRound(s0 + (s1 - s0) * k / 4, (s1 - s0) / 4);
        ctx.fillText(fmt(sv), Math.min(width - 20, Math.max(left + 12, stepX(sv))), top + plotH + 4);
      }
      ctx.fillText("step", left + plotW / 2, top + plotH + 15);
      spec.marks.forEach(function (m) {
        if (m.step < s0 || m.step > s1) return;
        var x = stepX(m.step);
        ctx.strokeStyle = m.color; ctx.globalAlpha = m.primary ? 0.9 : 0.4;
        ctx.setLineDash([4, 3]); ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + plotH); ctx.stroke();
        ctx.setLineDash([]); ctx.globalAlpha = 1;
        if (m.primary) { ctx.fillStyle = m.color; ctx.font = "bold 11px system-ui, sans-serif"; ctx.textBaseline = "bottom"; ctx.fillText(m.label, x, top - 2); ctx.font = "11px system-ui, sans-serif"; }
      });
      geo = { left: left, top: top, cw: cw, rowH: rowH, plotW: plotW, plotH: plotH };
      rangeText.textContent = "step " + fmt(s0) + " – " + fmt(s1);
      box.dataset.xMin = String(s0); box.dataset.xMax = String(s1);
      var unit = state.log ? "log10 " : "";
      scale.textContent = "colour: " + unit + (spec.value || "value") + " from " + fmt(vmin) + " (dark) to " + fmt(vmax) + " (yellow); grey: not logged";
    }

    function cellAt(ev) {
      var r = canvas.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top;
      if (!geo || x < geo.left || x > geo.left + geo.plotW || y < geo.top || y > geo.top + geo.plotH) return null;
      return { row: Math.min(rows.length - 1, Math.floor((y - geo.top) / geo.rowH)), col: Math.min(state.hi, state.lo + Math.floor((x - geo.left) / geo.cw)), x: x, y: y };
    }
    var dragFrom = null;
    canvas.addEventListener("mousemove", function (ev) {
      var c = cellAt(ev);
      if (!c) { tip.hidden = true; return; }
      var v = z[c.row * nc + c.col];
      tip.textContent = rows[c.row] + " · step " + fmt(spec.x0[c.col]) + (spec.x1[c.col] !== spec.x0[c.col] ? "–" + fmt(spec.x1[c.col]) : "") + " · max " + (v === null ? "not logged" : fmt(v));
      tip.hidden = false;
      tip.style.left = Math.min(c.x + 12, canvas.clientWidth - 200) + "px";
      tip.style.top = (c.y + 12) + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("mousedown", function (ev) { var c = cellAt(ev); dragFrom = c ? c.col : null; });
    canvas.addEventListener("mouseup", function (ev) {
      var c = cellAt(ev);
      if (dragFrom !== null && c && Math.abs(c.col - dragFrom) >= 1) {
        state.lo = Math.min(dragFrom, c.col); state.hi = Math.max(dragFrom, c.col); draw();
      }
      dragFrom = null;
    });
    canvas.addEventListener("dblclick", function () { state.lo = 0; state.hi = nc - 1; draw(); });
    draw();
    var last = plotWidth(box);
    window.addEventListener("resize", function () { var w = plotWidth(box); if (w !== last) { last = w; draw(); } });
    api.charts[spec.key] = { spec: spec, state: state };
  }

  document.querySelectorAll("[data-tdiag-chart]").forEach(function (box) {
    var spec = specs[box.dataset.tdiagChart];
    if (!spec) return;
    try {
      if (spec.kind === "heatmap") { if (spec.ncols > 0) heatmap(box, spec); }
      else lines(box, spec);
      box.dataset.drawn = "1";
    } catch (err) {
      box.appendChild(el("p", "muted", "This chart could not be drawn: " + err.message));
      console.error(err);
    }
  });
})();
