// llm-proxy console: enhancements only; every page works without this file.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // A copy button beside the token shown once after creation.
  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    const field = document.getElementById(button.dataset.copy);
    if (!field) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        button.textContent = "Copied";
      } catch (error) {
        button.textContent = "Press Ctrl+C to copy";
      }
    });
  }
  // Ask before a change that cannot be undone.
  for (const form of document.querySelectorAll("form.danger")) {
    form.addEventListener("submit", (event) => {
      const label = form.querySelector("button")?.textContent ?? "this";
      if (!window.confirm(`${label}? This cannot be undone.`)) event.preventDefault();
    });
  }
});
