// User management (admins): list, add, delete.
"use strict";

async function loadUsers() {
  const data = await PC.api("GET", "/admin/api/users");
  const body = document.querySelector("#users tbody");
  body.replaceChildren();
  for (const user of data.users) {
    const remove = PC.el("button", { type: "button" }, "Delete");
    remove.addEventListener("click", async () => {
      if (!confirm(`Delete user ${user.username}?`)) return;
      try {
        await PC.api("DELETE", "/admin/api/users/" + encodeURIComponent(user.username));
        PC.status(`deleted ${user.username}`, "ok");
        loadUsers();
      } catch (error) {
        PC.status(error.message, "error");
      }
    });
    body.append(
      PC.el(
        "tr",
        {},
        PC.el("td", {}, user.username),
        PC.el("td", {}, user.role),
        PC.el("td", {}, user.created_at ? new Date(user.created_at).toLocaleDateString() : ""),
        PC.el("td", {}, remove),
      ),
    );
  }
}

document.getElementById("add-user").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const created = await PC.api("POST", "/admin/api/users", Object.fromEntries(form));
    PC.status(`added ${created.username} (${created.role})`, "ok");
    event.target.reset();
    loadUsers();
  } catch (error) {
    PC.status(error.message, "error");
  }
});

loadUsers().catch((error) => PC.status(error.message, "error"));
