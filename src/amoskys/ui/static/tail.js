// Live tail for the Events page: polls /api/v1/events/tail for events after the newest cursor
// shown and prepends them. Builds rows with textContent only: event data is never parsed as HTML.
"use strict";
(function () {
  const button = document.getElementById("tail-toggle");
  const status = document.getElementById("tail-status");
  if (!button) return;
  let cursor = Number(button.dataset.cursor || "0");
  let timer = null;

  function table() {
    let body = document.querySelector("#events tbody");
    if (!body) {
      const t = document.createElement("table");
      t.id = "events";
      t.className = "events";
      t.appendChild(document.createElement("tbody"));
      button.parentElement.after(t);
      body = t.tBodies[0];
    }
    return body;
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function addRow(e) {
    const row = table().insertRow(0);
    row.className = "fresh sev-" + e.severity;
    cell(row, e.time, "nowrap");
    const host = cell(row, "");
    const link = document.createElement("a");
    link.href = e.host_url;
    link.textContent = e.host;
    host.appendChild(link);
    cell(row, e.agent_id);
    cell(row, e.kind);
    const sev = document.createElement("span");
    sev.className = "sev sev-" + e.severity;
    sev.textContent = e.severity;
    cell(row, "").appendChild(sev);
    cell(row, e.summary, "summary");
  }

  async function poll() {
    try {
      const query = button.dataset.query + "&after_cursor=" + cursor;
      const response = await fetch("/api/v1/events/tail?" + query, { credentials: "same-origin" });
      if (!response.ok) throw new Error(response.status + " " + response.statusText);
      const data = await response.json();
      data.events.slice().reverse().forEach(addRow);
      cursor = data.cursor;
      status.textContent = "live · " + new Date().toLocaleTimeString();
    } catch (err) {
      status.textContent = "tail paused: " + err.message;
    }
    if (timer !== null) timer = setTimeout(poll, 2000);
  }

  button.addEventListener("click", function () {
    if (timer === null) {
      button.textContent = "Stop tail";
      button.classList.add("on");
      timer = setTimeout(poll, 0);
    } else {
      clearTimeout(timer);
      timer = null;
      button.textContent = "Live tail";
      button.classList.remove("on");
      status.textContent = "";
    }
  });
})();
