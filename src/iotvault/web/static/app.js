/* iotvault web application: tabs, the device chart, live events, commands, security events.
   No inline script anywhere: this file is loaded with `defer` and finds its work in the page.
   Calls go to the /iotf API with the session cookie; the server adds the token and checks
   the X-CSRF-Token header on every change. */
"use strict";

(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    opts.headers = Object.assign({ "Accept": "application/json", "X-CSRF-Token": csrf }, opts.headers);
    return fetch(path, opts);
  }

  // Same rule as iotvault/web/flatten.py: nested keys joined with dots, bounded.
  function flatten(value) {
    const out = {};
    let n = 0;
    (function walk(v, path, depth) {
      if (n >= 64) { out["…"] = "…"; return; }
      if (v !== null && typeof v === "object") {
        if (depth >= 8) { out[path || "…"] = "…"; return; }
        for (const k of Object.keys(v)) walk(v[k], path ? path + "." + k : String(k), depth + 1);
        return;
      }
      out[path || "value"] = v; n += 1;
    })(value, "", 0);
    return out;
  }

  // an event in another format than json: one field named for its format (web/flatten.py)
  function fieldsOf(ev) {
    if (ev.payload === null) return {};
    if (!ev.payloadEncoding) return flatten(ev.payload);
    const label = ev.payloadEncoding === "text" ? ev.format : ev.format + " (" + ev.payloadEncoding + ")";
    const out = {};
    out[label] = ev.payload.length <= 200 ? ev.payload : ev.payload.slice(0, 200) + "…";
    return out;
  }

  function isNumber(v) { return typeof v === "number" && isFinite(v); }
  function text(v) { return v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v); }

  /* ---- tabs (devices page: one device per tab on a phone) ---------------------------- */
  function setupTabs() {
    const list = document.querySelector('.tabs[role="tablist"]');
    if (!list) return;
    const tabs = Array.from(list.querySelectorAll('[role="tab"]'));
    function select(tab) {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", on ? "true" : "false");
        t.tabIndex = on ? 0 : -1;
        const panel = document.getElementById(t.getAttribute("aria-controls"));
        if (panel) panel.classList.toggle("inactive", !on);
      }
      followCards();
    }
    tabs.forEach(function (t, i) {
      t.addEventListener("click", function () { select(t); });
      t.addEventListener("keydown", function (e) {
        let j = null;
        if (e.key === "ArrowRight") j = (i + 1) % tabs.length;
        if (e.key === "ArrowLeft") j = (i - 1 + tabs.length) % tabs.length;
        if (e.key === "Home") j = 0;
        if (e.key === "End") j = tabs.length - 1;
        if (j !== null) { e.preventDefault(); select(tabs[j]); tabs[j].focus(); }
      });
    });
    select(tabs[0]);
  }

  /* ---- the devices page: the cards on screen follow their device live -------------------- */
  // At most LIVE_CARDS streams at once: a browser keeps about six connections per server, and
  // the page's other requests need some. On a phone only the selected tab's device streams.
  const LIVE_CARDS = 4;
  const cardStreams = {};

  function updateCard(card, ev) {
    const fields = fieldsOf(ev);
    const values = card.querySelector("dl.values") || document.createElement("dl");
    values.className = "values"; values.textContent = "";
    for (const k of Object.keys(fields)) {
      const div = document.createElement("div"), dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = text(fields[k]); div.append(dt, dd); values.appendChild(div);
    }
    let latest = card.querySelector(".latest");
    if (!latest) { latest = document.createElement("p"); latest.className = "muted latest"; }
    latest.textContent = "Latest event " + ev.timestamp + " (" + ev.eventType + ")";
    const none = card.querySelector(".no-events"); if (none) none.remove();
    const link = card.querySelector("p:last-child");
    card.insertBefore(latest, link); card.insertBefore(values, link);
    const status = card.querySelector(".status"); status.textContent = "online"; status.className = "status online";
    const seen = card.querySelector(".last-seen"); if (seen) seen.textContent = ev.timestamp;
  }

  function followCards() {
    const cards = Array.from(document.querySelectorAll("section.device-card"))
      .filter(function (c) { return c.offsetParent !== null; }).slice(0, LIVE_CARDS);
    const wanted = new Set(cards.map(function (c) { return c.dataset.device; }));
    for (const id of Object.keys(cardStreams)) {
      if (!wanted.has(id)) { cardStreams[id].close(); delete cardStreams[id]; }
    }
    for (const card of cards) {
      const id = card.dataset.device;
      if (cardStreams[id] || !window.EventSource) continue;
      const source = new EventSource("/iotf/devices/" + encodeURIComponent(id) + "/stream");
      source.addEventListener("event", function (m) { updateCard(card, JSON.parse(m.data)); });
      cardStreams[id] = source;
    }
  }

  /* ---- chart ---------------------------------------------------------------------------- */
  const PALETTE = ["#0b4f6c", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#0e7490", "#a16207", "#be185d"];

  function makeChart(el, data) {
    if (typeof uPlot === "undefined") {
      el.textContent = "The chart library is not installed (make assets); the table has every value.";
      return null;
    }
    const names = Object.keys(data.series);
    if (!names.length) { el.textContent = "No numeric fields to chart."; }
    const series = [{}].concat(names.map(function (n, i) {
      return { label: n, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true, dash: i >= PALETTE.length ? [6, 4] : undefined };
    }));
    const opts = {
      width: Math.max(280, el.clientWidth || 600), height: 280, series: series, scales: { x: { time: true } },
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },  // as the table: UTC
    };
    const plot = new uPlot(opts, [data.t].concat(names.map(function (n) { return data.series[n]; })), el);
    window.addEventListener("resize", function () { plot.setSize({ width: Math.max(280, el.clientWidth), height: 280 }); });
    return { plot: plot, names: names, data: data };
  }

  /* ---- the device page ------------------------------------------------------------------ */
  function setupDevice() {
    const table = document.getElementById("events");
    const chartEl = document.getElementById("chart");
    if (!table || !chartEl) return;
    const data = JSON.parse(document.getElementById("chart-data").textContent);
    let chart = makeChart(chartEl, data);
    const device = table.dataset.device;
    const head = table.tHead.rows[0];
    let columns = Array.from(head.cells).slice(2).map(function (c) { return c.textContent; });

    function addEvent(ev) {
      if (table.querySelector('tr[data-id="' + CSS.escape(ev.eventId) + '"]')) return;
      const fields = fieldsOf(ev);
      for (const k of Object.keys(fields)) {
        if (columns.indexOf(k) < 0) {
          columns.push(k);
          const th = document.createElement("th"); th.scope = "col"; th.textContent = k; head.appendChild(th);
          for (const row of table.tBodies[0].rows) row.appendChild(document.createElement("td"));
        }
      }
      const tr = document.createElement("tr");
      tr.dataset.id = ev.eventId;
      const time = document.createElement("td");
      const t = document.createElement("time"); t.dateTime = ev.timestamp; t.textContent = ev.timestamp; time.appendChild(t);
      tr.appendChild(time);
      const type = document.createElement("td"); type.textContent = ev.eventType; tr.appendChild(type);
      for (const c of columns) { const td = document.createElement("td"); td.textContent = text(fields[c]); tr.appendChild(td); }
      table.tBodies[0].insertBefore(tr, table.tBodies[0].firstChild);
      const none = document.getElementById("no-events"); if (none) none.remove();
      document.getElementById("last-seen").textContent = ev.timestamp;
      const status = document.getElementById("status"); status.textContent = "online"; status.className = "status online";
      // the chart: a new time, and a value (or a gap) for every numeric field
      data.t.push(Date.parse(ev.timestamp) / 1000);
      let grew = false;
      for (const k of Object.keys(fields)) {
        if (isNumber(fields[k]) && !(k in data.series)) { data.series[k] = data.t.slice(0, -1).map(function () { return null; }); grew = true; }
      }
      for (const n of Object.keys(data.series)) data.series[n].push(isNumber(fields[n]) ? fields[n] : null);
      if (chart && !grew) {
        chart.plot.setData([data.t].concat(chart.names.map(function (n) { return data.series[n]; })));
      } else if (typeof uPlot !== "undefined") {
        if (chart) chart.plot.destroy();
        chartEl.textContent = "";
        chart = makeChart(chartEl, data);
      }
      table.dispatchEvent(new CustomEvent("iotvault:event", { detail: ev.eventId }));
    }

    if (table.dataset.live === "true" && window.EventSource) {
      const live = document.getElementById("live");
      const source = new EventSource("/iotf/devices/" + encodeURIComponent(device) + "/stream");
      source.addEventListener("open", function () { live.textContent = "live updates: on"; });
      source.addEventListener("error", function () { live.textContent = "live updates: reconnecting…"; });
      source.addEventListener("event", function (m) { addEvent(JSON.parse(m.data)); });
    }
    setupCommands();
  }

  /* ---- commands ------------------------------------------------------------------------- */
  function setupCommands() {
    const form = document.getElementById("command-form");
    if (!form) return;
    const list = document.getElementById("command-list");
    const device = form.dataset.device;
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      let payload;
      const problem = document.getElementById("payload-error");
      problem.textContent = "";
      try { payload = JSON.parse(form.payload.value || "{}"); } catch (err) { payload = null; }
      if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
        problem.textContent = "The payload must be a JSON object, e.g. {\"interval\": 5}.";
        form.payload.setAttribute("aria-invalid", "true");
        form.payload.focus();
        return;
      }
      form.payload.removeAttribute("aria-invalid");
      const row = document.createElement("tr");
      const name = document.createElement("td"); name.textContent = form.command.value;
      const id = document.createElement("td"); const status = document.createElement("td");
      status.className = "command-status"; status.textContent = "sending…";
      row.append(name, id, status); list.insertBefore(row, list.firstChild);
      api("/iotf/devices/" + encodeURIComponent(device) + "/commands", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ command: form.command.value, payload: payload }),
      }).then(function (r) { return r.json().then(function (b) { return [r, b]; }); }).then(function (rb) {
        if (!rb[0].ok) { status.textContent = "refused: " + (rb[1].detail || rb[0].status); return; }
        id.textContent = rb[1].commandId; status.textContent = rb[1].status + deliveryNote(rb[1]);
        follow(device, rb[1].commandId, status, 0);
      }).catch(function () { status.textContent = "not sent (network)"; });
    });
  }

  // every second for a minute, then every 5 s: a command stays "sent" until its device answers
  // or it expires (the server's command_expiry_s)
  // a command the device got without a signature says so wherever it is shown
  function deliveryNote(b) { return b.delivery === "unsigned" ? " — unsigned delivery" : ""; }

  function follow(device, commandId, cell, n) {
    if (n > 300) return;
    setTimeout(function () {
      api("/iotf/devices/" + encodeURIComponent(device) + "/commands/" + commandId).then(function (r) { return r.json(); }).then(function (b) {
        cell.textContent = b.status + (b.reason ? " (" + b.reason + ")" : "") + deliveryNote(b);
        if (b.status === "sent") follow(device, commandId, cell, n + 1);
      });
    }, n < 60 ? 1000 : 5000);
  }

  /* ---- security events ------------------------------------------------------------------ */
  function setupSecurity() {
    const table = document.getElementById("security-events");
    if (!table) return;
    const form = document.getElementById("security-filter");
    const count = document.getElementById("security-count");
    let events = [];
    function render() {
      const kind = form.kind.value, dev = form.device.value.trim(), user = form.user.value.trim();
      const since = form.since.value ? Date.parse(form.since.value + ":00Z") : null;
      const body = table.tBodies[0]; body.textContent = "";
      const shown = events.filter(function (e) {
        if (kind && e.kind !== kind) return false;
        if (dev && (e.deviceId || "").indexOf(dev) < 0 && (e.subject || "").indexOf(dev) < 0) return false;
        if (user && (e.subject || "").indexOf(user) < 0) return false;
        if (since && Date.parse(e.timestamp) < since) return false;
        return true;
      });
      for (const e of shown) {
        const tr = document.createElement("tr");
        const rest = Object.assign({}, e); delete rest.timestamp; delete rest.kind; delete rest.deviceId; delete rest.subject;
        for (const v of [e.timestamp, e.kind, e.deviceId || e.subject || "", JSON.stringify(rest)]) {
          const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
        }
        body.appendChild(tr);
      }
      count.textContent = shown.length + " of " + events.length + " events shown";
    }
    form.addEventListener("input", render);
    api("/iotf/security/events?count=1000").then(function (r) { return r.json(); }).then(function (b) {
      events = b.events || [];
      const kinds = Array.from(new Set(events.map(function (e) { return e.kind; }))).sort();
      for (const k of kinds) { const o = document.createElement("option"); o.value = k; o.textContent = k; form.kind.appendChild(o); }
      render();
      // successes: people signing in; failures: refused people and refused devices (broker)
      const SUCCESS = ["oidc_login_succeeded", "oidc_anonymous_login"];
      const FAILURE = ["oidc_login_failed", "oidc_login_refused", "oidc_account_locked", "login_failed", "login_throttled"];
      const hours = {};
      const now = Math.floor(Date.now() / 3600000) * 3600;
      let first = now - 23 * 3600;  // at least the last 24 hours, every hour shown (0 when quiet)
      for (const e of events) {
        const ok = SUCCESS.indexOf(e.kind) >= 0, bad = FAILURE.indexOf(e.kind) >= 0;
        if (!ok && !bad) continue;
        const h = Math.floor(Date.parse(e.timestamp) / 3600000) * 3600;
        first = Math.min(first, h);
        hours[h] = hours[h] || [0, 0]; hours[h][ok ? 0 : 1] += 1;
      }
      const t = [];
      for (let h = first; h <= now; h += 3600) t.push(h);
      makeChart(document.getElementById("auth-chart"), {
        t: t, series: {
          successes: t.map(function (h) { return hours[h] ? hours[h][0] : 0; }),
          failures: t.map(function (h) { return hours[h] ? hours[h][1] : 0; }),
        },
      });
    });
  }

  function setupServiceWorker() {
    if ("serviceWorker" in navigator && window.isSecureContext) {
      navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch(function () {});
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupTabs(); followCards(); setupDevice(); setupSecurity(); setupServiceWorker();
  });
})();
