"use strict";

document.getElementById("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const gm = document.getElementById("gm").value.trim();
  const password = document.getElementById("password").value;
  const button = document.getElementById("signin");
  button.disabled = true;
  try {
    const me = await Console.api("POST", "/signin", { gm, password });
    location.assign(me.home);
  } catch (e) {
    Console.notice(e.message);
    button.disabled = false;
  }
});
