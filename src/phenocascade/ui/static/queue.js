// The queue page: filters in the URL, tasks in serving order, n opens the first task.
"use strict";

const params = new URLSearchParams(location.search);
let firstTask = null;

function filterQuery() {
  const q = new URLSearchParams();
  for (const key of ["tier", "study", "min_priority"]) {
    if (params.get(key)) q.set(key, params.get(key));
  }
  return q;
}

function taskUrl(task) {
  const q = filterQuery().toString();
  return `/tasks/${encodeURIComponent(task.tier)}/${encodeURIComponent(task.image_id)}` + (q ? "?" + q : "");
}

async function loadQueue() {
  const q = filterQuery();
  q.set("limit", "200");
  let data;
  try {
    data = await PC.api("GET", "/api/tasks?" + q.toString());
  } catch (error) {
    PC.status(error.message, "error");
    return;
  }
  const select = document.getElementById("f-tier");
  for (const tier of data.tiers) {
    select.append(PC.el("option", { value: tier, selected: tier === params.get("tier") }, tier));
  }
  document.getElementById("f-study").value = params.get("study") || "";
  document.getElementById("f-min").value = params.get("min_priority") || "";
  const body = document.querySelector("#queue tbody");
  body.replaceChildren();
  for (const task of data.tasks) {
    const claim = task.claimed_by ? `${task.claimed_by} until ${new Date(task.claim_expires_at).toLocaleTimeString()}` : "";
    body.append(
      PC.el(
        "tr",
        { "data-image-id": task.image_id, "data-tier": task.tier },
        PC.el("td", { class: "num" }, task.priority.toFixed(3)),
        PC.el("td", {}, task.tier),
        PC.el("td", {}, task.study || "—"),
        PC.el("td", {}, PC.el("a", { href: taskUrl(task), class: "task-link" }, task.image_id)),
        PC.el("td", {}, task.model_version),
        PC.el("td", { title: task.created_at }, PC.ago(task.created_at)),
        PC.el("td", {}, claim),
      ),
    );
  }
  firstTask = data.tasks[0] || null;
  if (data.studies && !data.studies.length) {
    PC.status("No study is granted to you yet: ask an admin to grant you one.", "error");
  } else {
    PC.status(data.tasks.length ? `${data.tasks.length} tasks` : "No task waits for these filters.");
  }
}

document.getElementById("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = new URLSearchParams();
  for (const [key, value] of new FormData(event.target)) if (value) q.set(key, value);
  location.search = q.toString();
});

document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, select, textarea")) return;
  if (event.key === "n" && firstTask) location.href = taskUrl(firstTask);
});

loadQueue();
