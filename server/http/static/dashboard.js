/* wkr-serving dashboard: polls dashboard/data every second and redraws without reload.
 *
 * The server keeps no history for this page (the bridge may run in several processes):
 * rates and time series are computed here from successive snapshots of the server's
 * counters. Depends only on uPlot (vendored in the package, see scripts/vendor_js.sh).
 */
(function () {
  "use strict";

  var POLL_MS = 1000;        // one snapshot per second
  var FETCH_LIMIT_MS = 5000; // a poll that takes longer counts as failed
  var WINDOW_S = 120;        // seconds the time-series charts show
  var RECENT_S = 60;         // "last minute" batch-size distribution
  var MIN_SPAN_S = 30;       // narrowest time axis (seconds)

  var COLORS = {
    blue: "#60a5fa", green: "#34d399", red: "#f87171", violet: "#a78bfa",
    pink: "#f472b6", amber: "#fbbf24", cyan: "#22d3ee", slate: "#94a3b8",
  };
  var WORKER_COLORS = ["#60a5fa", "#34d399", "#fbbf24", "#f472b6", "#a78bfa", "#22d3ee",
                       "#fb923c", "#a3e635"];
  var ROLE_NAMES = { supervisor: "Supervisor", ventilator: "Ventilator", sink: "Sink",
                    http: "HTTP bridge" };
  var AXIS = {
    stroke: "#8a9bb5",
    grid: { stroke: "rgba(148,163,184,0.10)", width: 1 },
    ticks: { stroke: "rgba(148,163,184,0.18)", width: 1, size: 4 },
    font: "11px system-ui, sans-serif",
  };

  // ---- state (exposed as window.wkrDashboard for tests and the curious) ----
  var state = {
    polls: 0,          // successful polls
    failures: 0,       // failed polls in a row
    last: null,        // last snapshot
    prev: null,        // the one before
    rates: { requests: 0, results: 0, errors: 0 },
    series: { t: [], req: [], res: [], err: [], p50: [], p99: [], queue: [], inflight: [] },
    cpu: { t: [], byWorker: {} },   // worker index -> [cpu %]
    batchHistory: [],  // [time, counts] snapshots for the recent distribution
    workerCpu: {},     // worker index -> last computed cpu %
    workerBusy: {},    // worker index -> last computed busy %
    charts: {},
  };
  window.wkrDashboard = state;

  // ---- formatting ----
  function $(id) { return document.getElementById(id); }
  function setText(id, text) {
    var el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }
  function fmtInt(n) {
    return n == null ? "–" : Math.round(n).toLocaleString("en-US");
  }
  function fmtRate(n) {
    if (n == null || !isFinite(n)) return "–";
    if (n >= 1000) return fmtInt(n);
    if (n >= 100) return n.toFixed(0);
    if (n >= 10) return n.toFixed(1);
    return n.toFixed(n === 0 ? 0 : 2);
  }
  function fmtMs(ms) {
    if (ms == null || !isFinite(ms)) return "–";
    if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
    if (ms >= 100) return ms.toFixed(0) + " ms";
    if (ms >= 10) return ms.toFixed(1) + " ms";
    return ms.toFixed(2) + " ms";
  }
  function fmtBytes(b) {
    if (b == null) return "–";
    if (b >= 1 << 30) return (b / (1 << 30)).toFixed(2) + " GiB";
    return (b / (1 << 20)).toFixed(b >= 100 * (1 << 20) ? 0 : 1) + " MiB";
  }
  function fmtMiB(mb) {
    if (mb == null) return "–";
    return mb >= 1024 ? (mb / 1024).toFixed(1) + " GiB" : mb.toFixed(0) + " MiB";
  }
  function fmtDuration(s) {
    if (s == null) return "–";
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function sumValues(obj) {
    var total = 0;
    for (var k in obj) if (Object.prototype.hasOwnProperty.call(obj, k)) total += obj[k];
    return total;
  }
  function clock(t) {
    var d = new Date(t * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  // ---- charts ----
  function chartWidth(el) { return Math.max(200, Math.floor(el.clientWidth)); }
  var CHART_HEIGHT = 230;

  function lineSeries(label, color, unit, fill) {
    return {
      label: label, stroke: color, width: 2, points: { show: false },
      fill: fill ? color + "22" : undefined,
      value: function (u, v) { return v == null ? "–" : unit(v); },
    };
  }

  // While the cursor is away, the legend shows each series' latest value, not dashes.
  function showLatest(u) {
    var n = u.data[0].length;
    if (!n || u.cursor.idx != null) return;
    var idxs = u.data.map(function (values) {
      for (var i = values.length - 1; i >= 0; i--) if (values[i] != null) return i;
      return n - 1;
    });
    idxs[0] = n - 1;
    u.setLegend({ idxs: idxs }, false);
  }

  function timeChart(id, series, yUnit, yRange, yIncrs) {
    var el = $(id);
    var opts = {
      width: chartWidth(el), height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      scales: {
        // at least MIN_SPAN_S wide (one point alone has no range), growing to WINDOW_S
        x: { time: true, range: function (u, min, max) {
          return min == null ? [0, 1] : [Math.min(min, max - MIN_SPAN_S), max];
        } },
        y: { range: yRange || function (u, min, max) { return [0, Math.max(1, max * 1.15)]; } },
      },
      axes: [
        Object.assign({}, AXIS, { space: 70, values: function (u, splits) {
          return splits.map(function (v) { return clock(v); });
        } }),
        Object.assign({}, AXIS, { size: 56, incrs: yIncrs, values: function (u, vals) {
          return vals.map(yUnit);
        } }),
      ],
      series: [{ label: "time", value: function (u, v) { return v == null ? "–" : clock(v); } }]
        .concat(series),
      hooks: { draw: [showLatest] },
    };
    var data = [[]].concat(series.map(function () { return []; }));
    return new uPlot(opts, data, el);
  }

  var INT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5,
                   5e5, 1e6, 2e6, 5e6, 1e7, 1e8, 1e9];

  function barChart(id, series, yUnit, yIncrs) {
    var el = $(id);
    var labels = [];
    var opts = {
      width: chartWidth(el), height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false }, points: { show: false } },
      legend: { live: false },
      scales: {
        x: { time: false, range: function (u) {
          var n = Math.max(1, labels.length);
          return [-0.6, n - 0.4];
        } },
        y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.15)]; } },
      },
      axes: [
        Object.assign({}, AXIS, {
          splits: function () { return labels.map(function (_, i) { return i; }); },
          values: function (u, splits) { return splits.map(function (i) { return labels[i]; }); },
          grid: { show: false },
        }),
        Object.assign({}, AXIS, { size: 56, incrs: yIncrs, values: function (u, vals) {
          return vals.map(yUnit);
        } }),
      ],
      series: [{ label: "", value: function (u, v) { return v == null ? "" : labels[v]; } }]
        .concat(series),
    };
    var data = [[]].concat(series.map(function () { return []; }));
    var chart = new uPlot(opts, data, el);
    chart.setLabels = function (next) { labels = next; };
    return chart;
  }

  function bars(color, label, align, unit) {
    return {
      label: label, stroke: color, fill: color + "cc", width: 0,
      paths: uPlot.paths.bars({ size: [align ? 0.38 : 0.6, 64], align: align, radius: 0.15 }),
      points: { show: false },
      value: function (u, v) { return v == null ? "–" : unit(v); },
    };
  }

  function makeCharts() {
    var perSec = function (v) { return fmtRate(v); };
    var ms = function (v) { return v >= 1000 ? (v / 1000).toFixed(1) + "s" : +v.toFixed(2) + ""; };
    var count = function (v) { return fmtInt(v); };
    var pct = function (v) { return +v.toFixed(1) + "%"; };
    state.charts.throughput = timeChart("chart-throughput", [
      lineSeries("requests/s", COLORS.blue, fmtRate, true),
      Object.assign(lineSeries("results/s", COLORS.green, fmtRate, false), { dash: [6, 4] }),
      lineSeries("errors/s", COLORS.red, fmtRate, false),
    ], perSec);
    state.charts.latency = timeChart("chart-latency", [
      lineSeries("p50", COLORS.violet, fmtMs, true),
      lineSeries("p99", COLORS.pink, fmtMs, false),
    ], ms);
    state.charts.queue = timeChart("chart-queue", [
      lineSeries("queued", COLORS.amber, fmtInt, true),
      lineSeries("in flight", COLORS.cyan, fmtInt, false),
    ], count, null, INT_INCRS);
    state.charts.batches = barChart("chart-batches", [
      bars(COLORS.slate, "since start", -1, pct),
      bars(COLORS.blue, "last minute", 1, pct),
    ], pct);
    state.charts.errors = barChart("chart-errors", [bars(COLORS.red, "errors", 0, fmtInt)],
                                   count, INT_INCRS);
    state.charts.cpu = null; // built once the workers are known (one series per worker)
  }

  function makeCpuChart(indices) {
    var el = $("chart-cpu");
    if (state.charts.cpu) { state.charts.cpu.destroy(); }
    el.innerHTML = "";
    state.charts.cpu = timeChart("chart-cpu", indices.map(function (i, k) {
      return lineSeries("worker " + i, WORKER_COLORS[k % WORKER_COLORS.length],
                        function (v) { return v.toFixed(0) + "%"; }, false);
    }), function (v) { return v.toFixed(0) + "%"; },
    function (u, min, max) { return [0, Math.max(100, max * 1.1)]; });
    state.cpuIndices = indices.join(",");
  }

  function resizeCharts() {
    var map = {
      throughput: "chart-throughput", latency: "chart-latency", queue: "chart-queue",
      batches: "chart-batches", errors: "chart-errors", cpu: "chart-cpu",
    };
    Object.keys(map).forEach(function (k) {
      var chart = state.charts[k];
      if (!chart) return;
      var w = chartWidth($(map[k]));
      if (Math.abs(chart.width - w) > 2) chart.setSize({ width: w, height: CHART_HEIGHT });
    });
  }

  // ---- one snapshot ----
  function push(arr, value) { arr.push(value); }
  function trim() {
    var s = state.series;
    var cutoff = s.t.length ? s.t[s.t.length - 1] - WINDOW_S : 0;
    var drop = 0;
    while (drop < s.t.length && s.t[drop] < cutoff) drop++;
    if (drop) {
      Object.keys(s).forEach(function (k) { s[k].splice(0, drop); });
    }
    var c = state.cpu;
    drop = 0;
    while (drop < c.t.length && c.t[drop] < cutoff) drop++;
    if (drop) {
      c.t.splice(0, drop);
      Object.keys(c.byWorker).forEach(function (k) { c.byWorker[k].splice(0, drop); });
    }
    while (state.batchHistory.length > 1 && state.batchHistory[0][0] < cutoff) {
      state.batchHistory.shift();
    }
  }

  function ingest(d) {
    var prev = state.last;
    var t = d.time;
    var c = d.counters;
    var errorsTotal = sumValues(d.errors || {});
    var dt = prev ? t - prev.time : 0;
    var restarted = prev && (c.requests < prev.counters.requests ||
                             c.results < prev.counters.results);
    if (prev && dt > 0 && !restarted) {
      state.rates.requests = Math.max(0, (c.requests - prev.counters.requests) / dt);
      state.rates.results = Math.max(0, (c.results - prev.counters.results) / dt);
      state.rates.errors = Math.max(0, (errorsTotal - sumValues(prev.errors || {})) / dt);
    } else {
      // first snapshot: the server's own one-second rate of replies is the best guess
      var tp = d.throughput_per_s || {};
      state.rates.requests = tp.last_1s || 0;
      state.rates.results = tp.last_1s || 0;
      state.rates.errors = 0;
    }
    var lat = d.latency_ms || {};
    var fresh = !prev || restarted ||
        c.results + errorsTotal > prev.counters.results + sumValues(prev.errors || {});
    var s = state.series;
    push(s.t, t);
    push(s.req, state.rates.requests);
    push(s.res, state.rates.results);
    push(s.err, state.rates.errors);
    // latency percentiles only move when replies arrive: draw a gap while idle
    push(s.p50, fresh && lat.p50 != null ? lat.p50 : null);
    push(s.p99, fresh && lat.p99 != null ? lat.p99 : null);
    push(s.queue, d.queue_items);
    push(s.inflight, d.in_flight_items);

    // per-worker CPU % and busy %: deltas of cumulative seconds when the pid is unchanged
    var prevWorkers = {};
    (prev ? prev.workers : []).forEach(function (w) { prevWorkers[w.index] = w; });
    d.workers.forEach(function (w) {
      var p = prevWorkers[w.index];
      var cpu = w.cpu_percent;
      var busy = null;
      if (p && p.pid === w.pid && dt > 0) {
        if (w.cpu_s != null && p.cpu_s != null) cpu = Math.max(0, (w.cpu_s - p.cpu_s) / dt * 100);
        if (w.busy_s != null && p.busy_s != null) {
          busy = Math.min(100, Math.max(0, (w.busy_s - p.busy_s) / dt * 100));
        }
      }
      state.workerCpu[w.index] = cpu;
      state.workerBusy[w.index] = busy;
    });
    var indices = d.workers.map(function (w) { return w.index; });
    if (state.cpuIndices !== indices.join(",")) {
      state.cpu = { t: s.t.slice(0, -1), byWorker: {} };
      indices.forEach(function (i) {
        state.cpu.byWorker[i] = state.cpu.t.map(function () { return null; });
      });
      makeCpuChart(indices);
    }
    state.cpu.t.push(t);
    indices.forEach(function (i) {
      var v = state.workerCpu[i];
      state.cpu.byWorker[i].push(v == null ? null : v);
    });

    state.batchHistory.push([t, (d.batch_size && d.batch_size.counts) || {}]);
    state.prev = prev;
    state.last = d;
    trim();
  }

  // ---- drawing ----
  function drawStats(d) {
    var c = d.counters, lat = d.latency_ms || {}, srv = d.server;
    var errorsTotal = sumValues(d.errors || {});
    setText("stat-req-rate", fmtRate(state.rates.requests));
    setText("stat-res-rate", fmtRate(state.rates.results));
    setText("stat-requests", fmtInt(c.requests));
    $("stat-requests-sub").title = fmtInt(c.requests) + " requests of " + fmtInt(c.items) +
      " items";
    setText("stat-results", fmtInt(c.results));
    setText("stat-p50", fmtMs(lat.p50));
    setText("stat-p90", fmtMs(lat.p90));
    setText("stat-p99", fmtMs(lat.p99));
    setText("stat-window", fmtInt(lat.window || 0));
    setText("stat-queue", fmtInt(d.queue_items));
    setText("stat-queue-max", fmtInt(srv.max_queue_size));
    setText("stat-inflight", fmtInt(d.in_flight_items));
    setText("stat-busy", fmtInt(d.busy_workers));
    setText("stat-nworkers", fmtInt(d.workers.length));
    setText("stat-errors", fmtInt(errorsTotal));
    setText("stat-err-rate", fmtRate(state.rates.errors));
    $("stat-errors").parentNode.classList.toggle("has-errors", errorsTotal > 0);
    setText("stat-batches", fmtInt(c.batches));
    setText("stat-retried", fmtInt(c.retried_items));
    setText("stat-poisoned", fmtInt(c.poisoned));
    setText("stat-quarantined", fmtInt(c.quarantined_inputs));
    setText("stat-vent-restarts", fmtInt(c.ventilator_restarts));
    $("recovery").classList.toggle("has-recovered", c.retried_items + c.poisoned +
      c.quarantined_inputs + c.ventilator_restarts > 0);
    setText("stat-batch-mean", d.batch_size && d.batch_size.mean ?
      d.batch_size.mean.toFixed(2) : "–");

    var served = srv.model || {};
    var model = [served.name ? served.name + (served.version ? " " + served.version : "")
                 : srv.model_name, srv.worker_class, srv.protocol + " protocol",
                 "batch ≤ " + srv.batch_size, "v" + srv.version].filter(Boolean).join(" · ");
    setText("model", model);
    setText("uptime", fmtDuration(srv.uptime_s));
    setText("updated", clock(d.time));
    var pill = $("status-pill");
    var text = srv.draining ? "draining" : srv.ready ? "ready" : "loading";
    pill.className = "pill " + (srv.draining ? "pill-bad" : srv.ready ? "pill-ok" : "pill-wait");
    pill.textContent = text;
    $("banner").hidden = true;
  }

  function drawCharts(d) {
    var s = state.series;
    state.charts.throughput.setData([s.t, s.req, s.res, s.err]);
    state.charts.latency.setData([s.t, s.p50, s.p99]);
    state.charts.queue.setData([s.t, s.queue, s.inflight]);
    if (state.charts.cpu) {
      var cpu = state.cpu;
      var idx = Object.keys(cpu.byWorker).map(Number).sort(function (a, b) { return a - b; });
      state.charts.cpu.setData([cpu.t].concat(idx.map(function (i) { return cpu.byWorker[i]; })));
    }

    // batch sizes: share of batches since start, and over the last minute
    var counts = (d.batch_size && d.batch_size.counts) || {};
    var maxSize = Math.max(d.server.batch_size || 1, Math.max.apply(null,
      Object.keys(counts).map(Number).concat([1])));
    var old = state.batchHistory[0][1];
    for (var i = 0; i < state.batchHistory.length; i++) {
      if (state.batchHistory[i][0] >= d.time - RECENT_S) { old = state.batchHistory[i][1]; break; }
    }
    var total = sumValues(counts), recentTotal = 0, recent = {};
    Object.keys(counts).forEach(function (k) {
      recent[k] = Math.max(0, counts[k] - (old[k] || 0));
      recentTotal += recent[k];
    });
    var labels = [], xs = [], all = [], last = [];
    for (var size = 1; size <= maxSize; size++) {
      labels.push(String(size));
      xs.push(size - 1);
      all.push(total ? 100 * (counts[size] || 0) / total : 0);
      last.push(recentTotal ? 100 * (recent[size] || 0) / recentTotal : 0);
    }
    state.charts.batches.setLabels(labels);
    state.charts.batches.setData([xs, all, last]);

    // errors by kind, since start
    var kinds = Object.keys(d.errors || {}).sort();
    state.charts.errors.setLabels(kinds.map(function (k) { return k.replace(/_/g, " "); }));
    state.charts.errors.setData([kinds.map(function (_, i) { return i; }),
                                 kinds.map(function (k) { return d.errors[k]; })]);
    $("errors-empty").hidden = kinds.length > 0;
  }

  function cell(text, cls, title) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    if (title) td.title = title;
    return td;
  }
  function meterCell(percent, scale, label, kind) {
    var td = document.createElement("td");
    if (percent == null) { td.textContent = "–"; td.className = "dim"; return td; }
    var wrap = document.createElement("div");
    wrap.className = "meter";
    var bar = document.createElement("div");
    bar.className = "meter-bar";
    var fill = document.createElement("div");
    fill.className = "meter-fill" + (kind ? " " + kind : "") + (percent / scale > 0.85 ? " hot" : "");
    fill.style.width = Math.min(100, 100 * percent / scale).toFixed(1) + "%";
    bar.appendChild(fill);
    var text = document.createElement("span");
    text.className = "meter-text";
    text.textContent = label;
    wrap.appendChild(bar);
    wrap.appendChild(text);
    td.appendChild(wrap);
    return td;
  }
  function pillCell(text, kind) {
    var td = document.createElement("td");
    var span = document.createElement("span");
    span.className = "pill pill-" + kind;
    span.textContent = text;
    td.appendChild(span);
    return td;
  }

  function drawTable(d) {
    var anyGpu = d.workers.some(function (w) { return w.gpu; });
    $("workers").classList.toggle("no-gpu", !anyGpu);
    setText("gpu-note", d.gpus && d.gpus.length ?
      d.gpus.length + " GPU(s): " + d.gpus.map(function (g) { return g.name; }).join(", ") :
      "no GPU on this machine");
    var body = document.createElement("tbody");
    body.id = "workers-body";
    d.workers.forEach(function (w) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-worker", w.index);
      if (w.pid != null) tr.setAttribute("data-pid", w.pid);
      tr.appendChild(cell("#" + w.index));
      tr.appendChild(cell(w.pid == null ? "–" : String(w.pid), "pid"));
      tr.appendChild(cell(w.device || "–"));
      var stateKind = { busy: "busy", idle: "idle", starting: "wait", restarting: "bad" };
      tr.appendChild(pillCell(w.state, stateKind[w.state] || "idle"));
      tr.appendChild(cell(fmtInt(w.batches_done), "num"));
      tr.appendChild(cell(fmtInt(w.items), "num"));
      tr.appendChild(cell(fmtInt(w.restarts), "num" + (w.restarts ? " err" : "")));
      var busy = state.workerBusy[w.index];
      tr.appendChild(cell(busy == null ? "–" : busy.toFixed(0) + "%", "num"));
      var cpu = state.workerCpu[w.index];
      tr.appendChild(meterCell(cpu, 100, cpu == null ? "–" : cpu.toFixed(0) + "%"));
      tr.appendChild(cell(fmtBytes(w.rss_bytes), "num"));
      var g = w.gpu;
      tr.appendChild(g ? meterCell(g.load_percent, 100, (g.load_percent || 0).toFixed(0) + "%",
                                   "gpu") : cell("–", "gpu-col dim"));
      if (g) tr.lastChild.className = "gpu-col";
      tr.appendChild(cell(g ? fmtMiB(g.memory_used_mb) + " / " + fmtMiB(g.memory_total_mb) : "–",
                          "gpu-col num" + (g ? "" : " dim")));
      tr.appendChild(cell(w.last_error || "", "err", w.last_error || ""));
      tr.appendChild(cell(w.model_version == null ? "–" : String(w.model_version),
                          "model-col", w.epoch == null ? "" : "epoch " + w.epoch));
      body.appendChild(tr);
    });
    $("workers").replaceChild(body, $("workers-body"));

    var procs = document.createElement("tbody");
    procs.id = "processes-body";
    procs.className = "processes";
    var prevProcs = {};
    (state.prev ? state.prev.processes : []).forEach(function (p) { prevProcs[p.role] = p; });
    (d.processes || []).forEach(function (p) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-role", p.role);
      tr.appendChild(cell(ROLE_NAMES[p.role] || p.role));
      tr.appendChild(cell(p.pid == null ? "–" : String(p.pid)));
      tr.appendChild(cell("–"));
      tr.appendChild(pillCell(p.alive ? "running" : "gone", p.alive ? "idle" : "bad"));
      for (var i = 0; i < 4; i++) tr.appendChild(cell("", "num"));
      var q = prevProcs[p.role];
      var cpu = p.cpu_percent;
      var dt = state.prev ? d.time - state.prev.time : 0;
      if (q && q.pid === p.pid && q.cpu_s != null && p.cpu_s != null && dt > 0) {
        cpu = Math.max(0, (p.cpu_s - q.cpu_s) / dt * 100);
      }
      tr.appendChild(meterCell(cpu, 100, cpu == null ? "–" : cpu.toFixed(0) + "%"));
      tr.appendChild(cell(fmtBytes(p.rss_bytes), "num"));
      tr.appendChild(cell("", "gpu-col"));
      tr.appendChild(cell("", "gpu-col"));
      tr.appendChild(cell(""));
      tr.appendChild(cell(""));
      procs.appendChild(tr);
    });
    $("workers").replaceChild(procs, $("processes-body"));
  }

  // ---- the served model, the latest switch ----
  var SWITCH_PILLS = { switching: "pill-wait", done: "pill-ok", failed: "pill-bad" };

  function modelLabel(target) {
    if (!target) return "";
    return (target.name || "") + (target.version ? " " + target.version : "");
  }

  function drawModel(d) {
    var srv = d.server, m = srv.model || {}, sw = srv["switch"];
    setText("model-name", m.name || srv.model_name || "–");
    setText("model-version", m.version || "–");
    setText("model-epoch", m.epoch == null ? "–" : String(m.epoch));
    setText("model-dir", m.dir || "–");
    var st = sw ? sw.state : "none";
    var pill = $("switch-state");
    pill.className = "pill " + (SWITCH_PILLS[st] || "pill-idle");
    pill.textContent = st;
    var detail = "";
    if (sw) {
      detail = "to " + modelLabel(sw.to);
      if (st === "switching") detail += ": " + fmtInt(sw.switched) + " / " + fmtInt(sw.total) +
        " workers";
      else if (st === "done" && sw.seconds != null) detail += " in " + sw.seconds.toFixed(1) + " s";
      else if (st === "failed") detail += ": " + (sw.error || "failed");
    }
    setText("switch-detail", detail);
    showTokenField(!!srv.token_required);
    var name = $("switch-name");
    if (!state.switchFormFilled && m.name) {  // the current name, once: a new version keeps it
      name.value = m.name;
      state.switchFormFilled = true;
    }
  }

  function switchMessage(text, kind) {
    var el = $("switch-message");
    el.textContent = text;
    el.className = "switch-message" + (kind ? " " + kind : "");
  }

  // POST v2/repository/models/<name>/load: answers once the switch is done or failed.
  function submitSwitch(event) {
    event.preventDefault();
    var name = $("switch-name").value.trim();
    if (!name) { switchMessage("Give the model's name.", "bad"); return; }
    var params = {};
    var dir = $("switch-dir").value.trim(), version = $("switch-version").value.trim();
    if (dir) params.model_dir = dir;
    if (version) params.version = version;
    var headers = { "Content-Type": "application/json", Accept: "application/json" };
    var token = $("switch-token").value;
    if (token) headers.Authorization = "Bearer " + token;
    var button = $("switch-submit");
    button.disabled = true;
    state.switching = true;
    switchMessage("Switching to " + name + (version ? " " + version : "") + "…", "");
    fetch("v2/repository/models/" + encodeURIComponent(name) + "/load", {
      method: "POST", headers: headers, cache: "no-store",
      body: JSON.stringify({ parameters: params }),
    })
      .then(function (r) {
        return r.json().then(function (body) {
          if (!r.ok) throw new Error(body.error || body.error_message || ("HTTP " + r.status));
          return body;
        });
      })
      .then(function (body) {
        state.switches = (state.switches || 0) + 1;
        switchMessage("Now serving " + (body.model_name || name) +
          (body.model_version ? " " + body.model_version : "") +
          (body.seconds != null ? " (switched in " + body.seconds.toFixed(1) + " s)" : ""), "ok");
      })
      .catch(function (err) {
        state.switchErrors = (state.switchErrors || 0) + 1;
        switchMessage("Switch failed: " + (err && err.message ? err.message : String(err)), "bad");
      })
      .then(function () { button.disabled = false; state.switching = false; });
  }

  function showFailure(message) {
    state.failures += 1;
    var pill = $("status-pill");
    pill.className = "pill pill-bad";
    pill.textContent = "unreachable";
    var banner = $("banner");
    banner.textContent = "The server does not answer: " + message + " (retrying every second)";
    banner.hidden = false;
  }

  // With -http_token, open the page as /dashboard?token=...: the data requests then
  // carry it as a bearer token (the page and its static files need none).
  var DATA_HEADERS = { Accept: "application/json" };
  var pageToken = new URLSearchParams(window.location.search).get("token");
  if (pageToken) DATA_HEADERS.Authorization = "Bearer " + pageToken;
  // The token field of the switch form: shown when the bridge has a token (or refused a
  // poll for want of one); what is typed there is used for the data requests too.
  $("switch-token").value = pageToken || "";
  function showTokenField(show) {
    if (show) $("switch-token-label").hidden = false;
  }
  $("switch-token").addEventListener("input", function () {
    var token = $("switch-token").value;
    if (token) DATA_HEADERS.Authorization = "Bearer " + token;
    else delete DATA_HEADERS.Authorization;
  });

  // ---- polling loop: one request at a time, about once a second ----
  function poll() {
    var started = Date.now();
    var controller = window.AbortController ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, FETCH_LIMIT_MS)
                           : null;
    fetch("dashboard/data", { cache: "no-store", signal: controller && controller.signal,
                              headers: DATA_HEADERS })
      .then(function (r) {
        if (r.status === 401) showTokenField(true);  // the page needs the bridge's token
        return r.json().then(function (body) {
          if (!r.ok || !body.ok) {
            throw new Error(body.error || body.error_message || ("HTTP " + r.status));
          }
          return body;
        });
      })
      .then(function (d) {
        ingest(d);
        drawStats(d);
        drawCharts(d);
        drawTable(d);
        drawModel(d);
        state.failures = 0;
        state.polls += 1;
      })
      .catch(function (err) { showFailure(err && err.message ? err.message : String(err)); })
      .then(function () {
        if (timer) clearTimeout(timer);
        setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started)));
      });
  }

  makeCharts();
  $("switch-form").addEventListener("submit", submitSwitch);
  if (window.ResizeObserver) {
    new ResizeObserver(resizeCharts).observe(document.querySelector(".charts"));
  } else {
    window.addEventListener("resize", resizeCharts);
  }
  poll();
})();
