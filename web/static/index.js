// Upload page: drag-and-drop with previews, then submit to the API and go to the batch page.
(function () {
  "use strict";
  const form = document.getElementById("submit-form");
  const input = document.getElementById("images");
  const zone = document.getElementById("dropzone");
  const previews = document.getElementById("previews");
  const errorBox = document.getElementById("form-error");
  const button = document.getElementById("submit");
  let files = [];  // the selection, kept here so files can be added from several drops

  function render() {
    previews.replaceChildren();
    files.forEach((file, i) => {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.alt = file.name;
      img.src = URL.createObjectURL(file);
      img.onload = () => URL.revokeObjectURL(img.src);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", "Remove " + file.name);
      remove.addEventListener("click", () => { files.splice(i, 1); render(); });
      li.append(img, remove);
      previews.append(li);
    });
  }

  function add(list) {
    for (const f of list) files.push(f);
    render();
  }

  input.addEventListener("change", () => { add(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => { e.preventDefault(); add(e.dataTransfer.files); });
  // Keyboard: the file input itself takes focus (the zone lights up) and opens on Enter/Space.

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errorBox.hidden = true;
    const data = new FormData();
    files.forEach((f) => data.append("images", f, f.name));
    data.append("urls", document.getElementById("urls").value);
    data.append("top_k", document.getElementById("top_k").value);
    button.disabled = true;
    button.textContent = "Uploading…";
    try {
      const resp = await fetch("/api/v1/batches", { method: "POST", body: data });
      const body = await resp.json().catch(() => ({}));
      if (resp.status === 202) { window.location.assign(body.links.page); return; }
      throw new Error((body.error && body.error.message) || ("HTTP " + resp.status));
    } catch (err) {
      errorBox.textContent = err.message;
      errorBox.hidden = false;
      button.disabled = false;
      button.textContent = "Classify";
    }
  });
})();
