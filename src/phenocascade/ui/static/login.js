// The login form: posts JSON with the anonymous session's CSRF token.
"use strict";

// The server checks the target too (session.local_target); this repeats it so the page never
// leaves the site even if a reply were tampered with. Browsers drop tabs and line breaks from
// a URL and read "\" as "/", hence the character checks before the same-origin one.
function localTarget(next) {
  if (typeof next !== "string" || /[\u0000-\u001f\u007f-\u009f\s]/.test(next)) return "/queue";
  if (next !== "/" && !/^\/[^/\\]/.test(next)) return "/queue";
  const url = new URL(next, location.origin);
  return url.origin === location.origin ? url.pathname + url.search + url.hash : "/queue";
}

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
    location.href = localTarget(result.next);
  } catch (error) {
    PC.status(error.message, "error");
  }
});
