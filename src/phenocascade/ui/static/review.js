// The review page (reviewers): recent annotations of a tier, or every annotation of an image.
"use strict";

const reviewParams = new URLSearchParams(location.search);

async function loadReview() {
  const queue = await PC.api("GET", "/api/tasks?limit=1");
  const select = document.getElementById("f-tier");
  const wanted = reviewParams.get("tier") || queue.tiers[0];
  for (const tier of queue.tiers) select.append(PC.el("option", { value: tier, selected: tier === wanted }, tier));
  document.getElementById("f-image").value = reviewParams.get("image_id") || "";
  const q = new URLSearchParams({ tier: wanted, limit: "200" });
  if (reviewParams.get("image_id")) q.set("image_id", reviewParams.get("image_id"));
  try {
    const data = await PC.api("GET", "/api/annotations?" + q.toString());
    const body = document.querySelector("#annotations tbody");
    body.replaceChildren();
    for (const a of data.annotations) {
      body.append(
        PC.el(
          "tr",
          {},
          PC.el("td", { title: a.created_at }, new Date(a.created_at).toLocaleString()),
          PC.el("td", {}, a.tier),
          PC.el("td", {}, a.image_id),
          PC.el("td", {}, a.annotator),
          PC.el("td", {}, a.labels.join(", ") || "—"),
          PC.el("td", { class: "num" }, String(a.boxes.length)),
          PC.el("td", {}, a.model_version),
        ),
      );
    }
    PC.status(`${data.annotations.length} annotations`);
  } catch (error) {
    PC.status(error.message, "error");
  }
}

document.getElementById("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = new URLSearchParams();
  for (const [key, value] of new FormData(event.target)) if (value) q.set(key, value);
  location.search = q.toString();
});

loadReview();
