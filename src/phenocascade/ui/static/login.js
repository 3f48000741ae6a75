// The login form: posts JSON with the anonymous session's CSRF token.
"use strict";

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const next = new URLSearchParams(location.search).get("next") || "/queue";
  PC.status("Logging in…");
  try {
    const result = await PC.api("POST", "/login", {
      username: document.getElementById("username").value,
      password: document.getElementById("password").value,
      next,
    });
    location.href = result.next;
  } catch (error) {
    PC.status(error.message, "error");
  }
});
