// Shared helpers of every page: the JSON API with the CSRF header, safe DOM building, the header.
"use strict";

const ROLES = ["annotator", "reviewer", "admin"];

const PC = {
  csrf() {
    return document.querySelector('meta[name="csrf-token"]').content;
  },

  // Call the JSON API; throws an Error carrying the server's `detail` and the HTTP status.
  async api(method, url, body) {
    const headers = { Accept: "application/json" };
    const opts = { method, headers, credentials: "same-origin" };
    if (method !== "GET") headers["X-CSRF-Token"] = PC.csrf();
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const response = await fetch(url, opts);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (response.status === 401 && url !== "/login") {
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    }
    if (!response.ok) {
      const error = new Error((data && data.detail) || response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  },

  // Build an element; children are nodes or strings (always inserted as text, never as HTML).
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, "");
      else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },

  status(text, kind) {
    const node = document.getElementById("status");
    if (!node) return;
    node.textContent = text;
    node.className = kind || "";
  },

  role() {
    const meta = document.querySelector('meta[name="user-role"]');
    return meta ? meta.content : "";
  },

  ago(iso) {
    if (!iso) return "";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 129600) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  },
};

document.addEventListener("DOMContentLoaded", () => {
  const rank = ROLES.indexOf(PC.role());
  for (const link of document.querySelectorAll("[data-min-role]")) {
    if (rank < ROLES.indexOf(link.dataset.minRole)) link.hidden = true;
  }
  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async () => {
      const result = await PC.api("POST", "/logout");
      location.href = result.next;
    });
  }
});
