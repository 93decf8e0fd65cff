// Batch page: long-poll the API, fill in each image's top classes as they arrive.
(function () {
  "use strict";
  const root = document.getElementById("batch");
  const api = root.dataset.api;
  const list = document.getElementById("results");
  const statusLine = document.getElementById("status-line");
  const cards = new Map();
  let latest = null;

  const share = document.getElementById("share-link");
  share.value = window.location.href;
  document.getElementById("copy-link").addEventListener("click", async (e) => {
    share.select();
    try { await navigator.clipboard.writeText(share.value); } catch (_) { document.execCommand("copy"); }
    e.target.textContent = "Copied";
    setTimeout(() => { e.target.textContent = "Copy link"; }, 1500);
  });

  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function sourceName(job) {
    const v = job.source.value || "";
    return job.source.type === "url" ? v : v;
  }

  const STATE_TEXT = { queued: "Queued…", fetching: "Fetching…", running: "Classifying…", cancelled: "Cancelled" };

  function renderJob(job) {
    let card = cards.get(job.job_id);
    if (!card) {
      card = el("li", "card");
      card.dataset.jobId = job.job_id;
      const img = el("img", "thumb");
      img.alt = "";
      card.append(img, el("div", "body"));
      cards.set(job.job_id, card);
      list.append(card);
    }
    const key = job.status + (job.image || "");
    if (card.dataset.key === key) return;
    card.dataset.key = key;
    card.className = "card " + job.status;
    const img = card.querySelector(".thumb");
    if (job.image && !img.getAttribute("src")) img.src = "/images/" + job.image + ".jpg";
    img.classList.toggle("none", !job.image);
    const body = card.querySelector(".body");
    body.replaceChildren(el("div", "name", sourceName(job)));
    body.firstChild.title = sourceName(job);
    if (job.status === "done") {
      if (job.uncertain) {
        const badge = el("div", "unsure", "Not sure");
        badge.title = "The model's top probability is low: on real photos, an answer this unsure is more likely wrong than right.";
        body.append(badge);
      }
      job.predictions.forEach((p, rank) => {
        const pct = (100 * p.probability).toFixed(1) + "%";
        const row = el("div", rank === 0 ? "pred best" : "pred");
        const label = el("div", "label");
        label.append(el("b", "", p.label), el("span", "", pct));
        const track = el("div", "track");
        const fill = el("div", "fill");
        fill.style.width = pct;
        track.append(fill);
        row.append(label, track);
        row.setAttribute("aria-label", p.label + " " + pct);
        body.append(row);
      });
    } else if (job.status === "failed") {
      body.append(el("div", "state", job.error ? job.error.message : "Failed"));
    } else {
      body.append(el("div", "state", STATE_TEXT[job.status] || job.status));
    }
  }

  const jobs = new Map();  // every job seen so far (with ?since the API sends only changed ones)

  // Cancel: every job not finished yet stops (finished ones keep their results).
  const cancelButton = document.getElementById("cancel");
  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try {
      const resp = await fetch(api + "/cancel", { method: "POST", headers: { Accept: "application/json" } });
      if (resp.ok) renderBatch(await resp.json());
    } finally {
      cancelButton.disabled = false;
    }
  });

  function renderBatch(b) {
    latest = b;
    b.jobs.forEach((j) => jobs.set(j.job_id, j));
    const c = b.counts;
    const pct = (n) => (b.total ? (100 * n) / b.total : 0) + "%";
    document.getElementById("bar-done").style.width = pct(c.done);
    document.getElementById("bar-failed").style.width = pct(c.failed);
    const bar = document.getElementById("progress");
    bar.setAttribute("aria-valuemax", b.total);
    bar.setAttribute("aria-valuenow", c.done + c.failed);
    const waiting = b.total - c.done - c.failed - c.cancelled;
    statusLine.textContent = `${c.done} done, ${c.failed} failed, ` + (c.cancelled ? `${c.cancelled} cancelled, ` : "") +
      `${waiting} waiting — ${b.total} in all` + (b.finished ? ". Finished." : "");
    cancelButton.hidden = b.finished;
    b.jobs.forEach(renderJob);
    if (b.finished) offerDownloads(Object.assign({}, b, { jobs: Array.from(jobs.values()) }));
  }

  // A spreadsheet runs a cell that starts with = + - @ (or tab, CR) as a formula, and batch
  // links are shared: such cells get a leading apostrophe (OWASP's CSV injection rule).
  function csvCell(v) {
    let text = String(v);
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
    return '"' + text.replace(/"/g, '""') + '"';
  }

  function offerDownloads(b) {
    const rows = [["source", "status", "rank", "label", "probability", "uncertain", "error"]];
    for (const j of b.jobs) {
      if (j.status === "done") j.predictions.forEach((p, i) => rows.push([sourceName(j), j.status, i + 1, p.label, p.probability, j.uncertain ? "yes" : "no", ""]));
      else rows.push([sourceName(j), j.status, "", "", "", "", j.error ? j.error.code : ""]);
    }
    const csv = rows.map((r) => r.map(csvCell).join(",")).join("\n");
    document.getElementById("dl-csv").href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    document.getElementById("dl-json").href = URL.createObjectURL(new Blob([JSON.stringify(b, null, 2)], { type: "application/json" }));
    document.getElementById("downloads").hidden = false;
  }

  async function poll() {
    let delay = 1000;  // backoff after errors, reset on success
    for (;;) {
      const url = latest ? `${api}?wait=20&since=${latest.version}` : api;
      try {
        const resp = await fetch(url, { headers: { Accept: "application/json" } });
        if (resp.status === 404) { statusLine.textContent = "This batch does not exist (or has expired)."; return; }
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        renderBatch(await resp.json());
        delay = 1000;
        if (latest.finished) return;
        // The server holds only so many long-polls at once; past that it answers at once and
        // says when to come back.
        const after = Number(resp.headers.get("Retry-After"));
        if (after > 0) await new Promise((r) => setTimeout(r, 1000 * after));
      } catch (err) {
        statusLine.textContent = "Connection problem (" + err.message + "); retrying…";
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 30000);
      }
    }
  }
  poll();
})();
