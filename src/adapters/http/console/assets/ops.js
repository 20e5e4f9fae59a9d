// The ops dashboard: one feed of figures from the relay, pushed when they change (about
// once a second while open). The page never asks NATS anything itself.
"use strict";

const $ = (id) => document.getElementById(id);

function status(node, s) {
  node.dataset.ok = s.ok ? "true" : "false";
  node.textContent = (s.ok ? "OK · " : "DOWN · ") + s.detail +
    (s.latency_ms != null ? " · " + s.latency_ms.toFixed(2) + " ms" : "");
}

function render(f) {
  const now = f.at_ms || Date.now();
  $("updated").textContent = f.at_ms ? "updated " + Console.time(f.at_ms) : "waiting for the first figures";
  status($("nats"), f.nats);
  status($("redis"), f.redis);
  $("rate-to-hosts").textContent = f.to_hosts_per_s.toFixed(1);
  $("rate-to-gms").textContent = f.to_gms_per_s.toFixed(1);

  $("gms-total").textContent = f.online_gms_total;
  const gms = $("gms");
  gms.textContent = "";
  for (const g of f.online_gms) gms.append(Console.el("li", { "data-gm": g.gm }, g.name + " (" + g.gm + ")"));

  $("hosts-total").textContent = f.hosts_total;
  $("hosts-partial").hidden = f.hosts_complete;
  const body = $("hosts");
  body.textContent = "";
  for (const h of f.hosts) {
    const tr = Console.el("tr", { "data-host": h.host, "data-kind": h.kind });
    tr.append(
      Console.el("td", { class: "host" }, h.host),
      Console.el("td", { class: "kind" }, h.kind),
      Console.el("td", { class: "lag", "data-lag": h.lag }, h.lag),
      Console.el("td", { class: "acked" }, h.acked_through),
      Console.el("td", { class: "delivery" }, Console.ago(h.last_delivery_ms, now)),
      Console.el("td", { class: "ack" }, Console.ago(h.last_ack_ms, now)),
      Console.el("td", { class: "consumers" },
        h.consumers.map((c) => c.name + ": " + c.pending + " pending, " + c.ack_pending + " unacked").join("; ")),
    );
    if (h.lag > 0) tr.classList.add("lagging");
    body.append(tr);
  }

  const errors = $("errors");
  errors.textContent = "";
  for (const e of [...f.recent_errors].reverse()) {
    const li = Console.el("li", { class: e.level });
    li.append(Console.el("time", {}, Console.time(e.at_ms)), " ",
              Console.el("strong", {}, e.level), " ", Console.el("span", {}, e.message));
    errors.append(li);
  }
  $("errors-empty").hidden = f.recent_errors.length > 0;
}

(() => {
  Console.wireSignOut();
  const source = new EventSource("/console/api/ops/live");
  Console.feedState(source);
  source.addEventListener("figures", (ev) => render(JSON.parse(ev.data)));
})();
