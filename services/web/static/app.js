// The dashboard's only script (the CSP allows no inline script):
// copy buttons, and a confirmation before destructive forms.
"use strict";

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const input = document.getElementById(button.dataset.copy);
  const status = document.getElementById("copy-status");
  input.select();
  try {
    await navigator.clipboard.writeText(input.value);
  } catch (_) {
    document.execCommand("copy"); // older browsers, or a page not served securely
  }
  button.textContent = "Copied";
  if (status) status.textContent = "Copied to the clipboard.";
});

// <form data-confirm="question">: ask first; the server asks again on a page of
// its own unless the form says confirm=yes, so the check holds without script.
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.dataset.confirm;
  if (!question) return;
  if (!window.confirm(question)) {
    event.preventDefault();
    return;
  }
  const field = form.querySelector("input[name=confirm]");
  if (field) field.value = "yes";
});
