// User management (admins): list, add, delete, and grant or revoke the studies of a user.
"use strict";

const USERS_API = "/admin/api/users/";

// Apply one change to a user (PATCH), report it, and reload the table.
async function changeUser(username, change, done) {
  try {
    await PC.api("PATCH", USERS_API + encodeURIComponent(username), change);
    PC.status(done, "ok");
    loadUsers();
  } catch (error) {
    PC.status(error.message, "error");
  }
}

// The studies cell: an admin sees every study; anyone else the studies granted (each with a
// revoke button), a field to grant one more, and "every study".
function studiesCell(user) {
  if (user.role === "admin") return PC.el("td", { class: "hint" }, "every study (admin)");
  const list = PC.el("ul", { class: "studies", "aria-label": `studies of ${user.username}` });
  for (const study of user.studies) {
    const revoke = PC.el("button", { type: "button", title: `revoke ${study}`, "aria-label": `revoke ${study}` }, "×");
    revoke.addEventListener("click", () =>
      changeUser(user.username, { revoke: [study] }, `revoked ${study} from ${user.username}`),
    );
    list.append(PC.el("li", { "data-study": study }, study, revoke));
  }
  if (!user.studies.length) list.append(PC.el("li", { class: "hint" }, "no study"));
  const every = PC.el("input", { type: "checkbox", name: "all_studies", checked: user.all_studies });
  every.addEventListener("change", () =>
    changeUser(
      user.username,
      { all_studies: every.checked },
      `${user.username} ${every.checked ? "may now access every study" : "keeps only the studies listed"}`,
    ),
  );
  const study = PC.el("input", { name: "study", placeholder: "study", required: true, maxlength: "200" });
  const grant = PC.el(
    "form",
    { class: "grant" },
    study,
    PC.el("button", { type: "submit" }, "Grant"),
    PC.el("label", {}, every, " every study"),
  );
  grant.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = study.value.trim();
    changeUser(user.username, { grant: [name] }, `granted ${name} to ${user.username}`);
  });
  return PC.el("td", {}, list, grant);
}

async function loadUsers() {
  const data = await PC.api("GET", "/admin/api/users");
  const body = document.querySelector("#users tbody");
  body.replaceChildren();
  for (const user of data.users) {
    const remove = PC.el("button", { type: "button" }, "Delete");
    remove.addEventListener("click", async () => {
      if (!confirm(`Delete user ${user.username}?`)) return;
      try {
        await PC.api("DELETE", USERS_API + encodeURIComponent(user.username));
        PC.status(`deleted ${user.username}`, "ok");
        loadUsers();
      } catch (error) {
        PC.status(error.message, "error");
      }
    });
    body.append(
      PC.el(
        "tr",
        { "data-user": user.username },
        PC.el("td", {}, user.username),
        PC.el("td", {}, user.role),
        studiesCell(user),
        PC.el("td", {}, user.created_at ? new Date(user.created_at).toLocaleDateString() : ""),
        PC.el("td", {}, remove),
      ),
    );
  }
}

document.getElementById("add-user").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = {
    username: form.get("username"),
    password: form.get("password"),
    role: form.get("role"),
    studies: String(form.get("studies") || "")
      .split("\n")
      .map((s) => s.trim())
      .filter(Boolean),
    all_studies: form.get("all_studies") !== null,
  };
  try {
    const created = await PC.api("POST", "/admin/api/users", body);
    PC.status(`added ${created.username} (${created.role})`, "ok");
    event.target.reset();
    loadUsers();
  } catch (error) {
    PC.status(error.message, "error");
  }
});

loadUsers().catch((error) => PC.status(error.message, "error"));
