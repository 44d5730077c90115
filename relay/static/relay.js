// The sign-in form's show/hide toggle for the API key. Loaded as an external module because
// the page's Content-Security-Policy allows no inline script. Without it the field simply
// stays a password field and the toggle stays hidden.

const field = document.getElementById("api-key");
const toggle = document.getElementById("api-key-toggle");

if (field instanceof HTMLInputElement && toggle instanceof HTMLButtonElement) {
  // The label stays "Show" and aria-pressed says whether the key is shown: the WAI-ARIA toggle
  // button pattern keeps the name fixed (a changing name would contradict the pressed state).
  toggle.addEventListener("click", () => {
    const show = field.type === "password";
    field.type = show ? "text" : "password";
    toggle.setAttribute("aria-pressed", String(show));
    field.focus();
  });
  toggle.hidden = false;
  // Never leave the key readable in a page restored from the back/forward cache.
  window.addEventListener("pagehide", () => {
    field.type = "password";
    toggle.setAttribute("aria-pressed", "false");
  });
}
