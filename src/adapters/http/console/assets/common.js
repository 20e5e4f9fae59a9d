// Shared helpers of the console pages. Text always goes in with textContent, never as
// HTML: messages come from players.
"use strict";

const Console = {
  // Calls the JSON API; resolves to the parsed body (null for 204), rejects with an Error
  // whose message is the server's. A 401 sends the page to the sign-in form.
  async api(method, path, body) {
    const init = { method, headers: {}, credentials: "same-origin" };
    if (method !== "GET") {
      // Every write says it is JSON, even without a body: the server refuses writes that
      // do not (a forged cross-site form cannot say so).
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    const res = await fetch("/console/api" + path, init);
    if (res.status === 401 && path !== "/signin") {
      location.assign("/console/signin");
      throw new Error("signed out");
    }
    const text = await res.text();
    const data = text ? JSON.parse(text) : null;
    if (!res.ok) {
      const err = new Error((data && data.error) || res.statusText);
      err.status = res.status;
      throw err;
    }
    return data;
  },

  el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  },

  notice(message) {
    const n = document.getElementById("notice");
    if (!n) return;
    n.textContent = message;
    n.hidden = !message;
    clearTimeout(Console.noticeTimer);
    if (message) Console.noticeTimer = setTimeout(() => { n.hidden = true; }, 6000);
  },

  time(ms) {
    if (!ms) return "–";
    return new Date(ms).toLocaleTimeString();
  },

  ago(ms, now) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round(((now || Date.now()) - ms) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  },

  // Shows a feed's state: live, or reconnecting (the browser retries by itself).
  feedState(source) {
    const badge = document.getElementById("live-state");
    const set = (state) => { badge.dataset.state = state; badge.textContent = state; };
    source.addEventListener("open", () => set("live"));
    source.addEventListener("error", () => set(source.readyState === EventSource.CLOSED ? "offline" : "reconnecting"));
  },

  wireSignOut() {
    const b = document.getElementById("signout");
    if (!b) return;
    b.addEventListener("click", async () => {
      try { await Console.api("POST", "/signout"); } catch (e) { /* signed out anyway */ }
      location.assign("/console/signin");
    });
  },
};
