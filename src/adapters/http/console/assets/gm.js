// The GM view: players by host with unread counts, one conversation at a time (paged
// history, live new messages, replies), players added and removed, presence.
//
// Each GM message shows two steps: "accepted" once the relay answered (the broker stored
// it), then "taken" once the player's server has acknowledged it (its consumer's ack floor
// reached the message's sequence; the page asks about once a second while any is pending).
"use strict";

const state = {
  me: null,            // { gm, role, view }
  players: new Map(),  // uid -> { uid, host, unread, unreadMore }
  open: null,          // uid of the open conversation
  oldest: null,        // history seq of the oldest message shown
  shown: new Set(),    // event ids shown in the open conversation
  pending: new Map(),  // event id -> { host, seq } of GM messages not yet taken
  feed: null,
};

const $ = (id) => document.getElementById(id);

// --- roster -----------------------------------------------------------------------

function renderPlayers() {
  const root = $("hosts");
  root.textContent = "";
  const byHost = new Map();
  for (const p of state.players.values()) {
    if (!byHost.has(p.host)) byHost.set(p.host, []);
    byHost.get(p.host).push(p);
  }
  const hosts = [...byHost.keys()].sort((a, b) => Number(a) - Number(b));
  for (const host of hosts) {
    const section = Console.el("section", { class: "host", "data-host": host });
    section.append(Console.el("h3", {}, "Host " + host));
    const list = Console.el("ul");
    for (const p of byHost.get(host).sort((a, b) => Number(a.uid) - Number(b.uid))) {
      const li = Console.el("li", { class: "player", "data-uid": p.uid });
      if (p.uid === state.open) li.classList.add("active");
      const open = Console.el("button", { type: "button", class: "open" }, p.uid);
      const badge = Console.el("span", { class: "unread" }, p.unread + (p.unreadMore ? "+" : ""));
      badge.hidden = p.unread === 0;
      open.append(" ", badge);
      open.addEventListener("click", () => openConversation(p.uid));
      const remove = Console.el("button", { type: "button", class: "remove", title: "Remove player " + p.uid }, "×");
      remove.addEventListener("click", () => removePlayer(p.uid));
      li.append(open, remove);
      list.append(li);
    }
    section.append(list);
    root.append(section);
  }
  $("players-empty").hidden = state.players.size > 0;
}

function renderPresence(online) {
  const b = $("presence");
  b.dataset.online = online ? "true" : "false";
  b.textContent = online ? "Online" : "Offline";
  b.title = online ? "Go offline" : "Go online";
}

async function loadMe() {
  const me = await Console.api("GET", "/me");
  state.me = me;
  if (!me.view) {
    // An ops-only supervisor has no conversations.
    location.assign("/console/ops");
    return null;
  }
  $("me-name").textContent = me.view.name + " (" + me.gm + ")";
  $("ops-link").hidden = me.role !== "supervisor";
  renderPresence(me.view.online);
  state.players.clear();
  for (const p of me.view.players) {
    state.players.set(p.uid, { uid: p.uid, host: p.host, unread: p.unread, unreadMore: p.unread_more });
  }
  const more = me.view.players_total - me.view.players.length;
  $("players-more").hidden = more <= 0;
  $("players-more").textContent = more > 0 ? "and " + more + " more" : "";
  renderPlayers();
  return me;
}

// --- conversation -----------------------------------------------------------------

function statusText(m) {
  if (m.from !== "gm") return "";
  if (m.taken) return "taken by server";
  return "accepted";
}

function messageNode(m) {
  const li = Console.el("li", { class: "msg from-" + m.from, "data-id": m.id, "data-seq": m.seq || "" });
  li.append(Console.el("span", { class: "text" }, m.text));
  const meta = Console.el("span", { class: "meta" }, Console.time(m.ts) + " ");
  if (m.from === "gm") {
    const status = Console.el("span", { class: "status", "data-status": m.taken ? "taken" : "accepted" }, statusText(m));
    meta.append(status);
    if (!m.taken && m.delivery_seq) state.pending.set(m.id, { host: m.host, seq: m.delivery_seq });
  }
  li.append(meta);
  return li;
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function appendMessage(m) {
  if (state.shown.has(m.id)) return;
  state.shown.add(m.id);
  $("messages").append(messageNode(m));
  scrollToEnd();
}

async function loadOlder() {
  const uid = state.open;
  const q = state.oldest ? "?before=" + state.oldest : "";
  const page = await Console.api("GET", "/players/" + uid + "/history" + q);
  if (uid !== state.open) return;
  const list = $("messages");
  const first = list.firstChild;
  for (const m of page.messages) {
    if (state.shown.has(m.id)) continue;
    state.shown.add(m.id);
    list.insertBefore(messageNode(m), first);
  }
  if (page.messages.length) state.oldest = page.messages[0].seq;
  $("older").hidden = !page.more;
  if (!q) scrollToEnd();
}

async function markRead(uid) {
  const p = state.players.get(uid);
  if (p) { p.unread = 0; p.unreadMore = false; }
  renderPlayers();
  try { await Console.api("POST", "/players/" + uid + "/read"); } catch (e) { /* next open retries */ }
}

async function openConversation(uid) {
  const p = state.players.get(uid);
  state.open = uid;
  state.oldest = null;
  state.shown.clear();
  $("messages").textContent = "";
  $("pick").hidden = true;
  $("conv").hidden = false;
  $("conv-title").textContent = "Player " + uid + (p ? " on host " + p.host : "");
  renderPlayers();
  try {
    await loadOlder();
    await markRead(uid);
  } catch (e) {
    Console.notice("Cannot load the conversation: " + e.message);
  }
  $("reply").focus();
}

async function sendReply(ev) {
  ev.preventDefault();
  const uid = state.open;
  const box = $("reply");
  const text = box.value.trim();
  if (!uid || !text) return;
  $("send").disabled = true;
  try {
    const sent = await Console.api("POST", "/players/" + uid + "/messages", { text });
    box.value = "";
    if (uid === state.open) {
      appendMessage({ id: sent.id, from: "gm", text, ts: Date.now(), host: sent.host,
                      delivery_seq: sent.delivery_seq, taken: false });
    }
    pollTaken();
  } catch (e) {
    Console.notice("Not sent: " + e.message);
  } finally {
    $("send").disabled = false;
  }
}

// Asks about the hosts of pending messages until every one is taken.
let takenTimer = null;
function pollTaken() {
  if (takenTimer) return;
  takenTimer = setTimeout(async () => {
    takenTimer = null;
    const hosts = new Set([...state.pending.values()].map((p) => p.host));
    for (const host of hosts) {
      try {
        const h = await Console.api("GET", "/hosts/" + host);
        const through = h.figures ? h.figures.acked_through : 0;
        for (const [id, p] of state.pending) {
          if (p.host === host && through >= p.seq) {
            state.pending.delete(id);
            const node = document.querySelector('#messages li[data-id="' + CSS.escape(id) + '"] .status');
            if (node) { node.dataset.status = "taken"; node.textContent = "taken by server"; }
          }
        }
      } catch (e) { /* try again next round */ }
    }
    if (state.pending.size) pollTaken();
  }, 1000);
}

// --- live feed --------------------------------------------------------------------

function openFeed(after) {
  // The browser reconnects by itself and sends Last-Event-ID, so the relay resumes right
  // after the last message this page got.
  const source = new EventSource("/console/api/live?after=" + after);
  Console.feedState(source);
  source.addEventListener("chat", (ev) => {
    const m = JSON.parse(ev.data);
    let p = state.players.get(m.uid);
    if (!p) {
      p = { uid: m.uid, host: m.host, unread: 0, unreadMore: false };
      state.players.set(m.uid, p);
    }
    if (m.uid === state.open && !document.hidden) {
      appendMessage({ id: m.id, from: "player", text: m.text, ts: m.ts, host: m.host });
      markRead(m.uid);
    } else {
      p.unread += 1;
      renderPlayers();
    }
  });
  state.feed = source;
}

// --- players and presence ---------------------------------------------------------

async function addPlayer(ev) {
  ev.preventDefault();
  const host = $("add-host").value.trim();
  const uid = $("add-uid").value.trim();
  try {
    await Console.api("POST", "/players", { host, uid });
    $("add-uid").value = "";
    await loadMe();
  } catch (e) {
    Console.notice("Cannot add player " + uid + ": " + e.message);
  }
}

async function removePlayer(uid) {
  if (!confirm("Remove player " + uid + "?")) return;
  try {
    await Console.api("DELETE", "/players/" + uid);
    if (state.open === uid) {
      state.open = null;
      $("conv").hidden = true;
      $("pick").hidden = false;
    }
    await loadMe();
  } catch (e) {
    Console.notice("Cannot remove player " + uid + ": " + e.message);
  }
}

async function togglePresence() {
  const online = $("presence").dataset.online !== "true";
  try {
    await Console.api("POST", "/presence", { online });
    renderPresence(online);
  } catch (e) {
    Console.notice("Cannot change presence: " + e.message);
  }
}

// --- start ------------------------------------------------------------------------

(async () => {
  Console.wireSignOut();
  $("add-form").addEventListener("submit", addPlayer);
  $("reply-form").addEventListener("submit", sendReply);
  $("reply").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("reply-form").requestSubmit(); }
  });
  $("older").addEventListener("click", () => loadOlder().catch((e) => Console.notice(e.message)));
  $("presence").addEventListener("click", togglePresence);
  try {
    const me = await loadMe();
    if (me) openFeed(me.view.live_after);
  } catch (e) {
    Console.notice("Cannot load your players: " + e.message);
  }
})();
